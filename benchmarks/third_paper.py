"""Cost of the Rethinking-OPD additions on one loss step's kept rows, measured through the real code paths:
the overlap-diagnostics pass (opsd.core.diagnostics.overlap_from_hidden, no grad) and each `--loss_support`
estimator's forward + backward (opsd.core.estimators) against the full-vocabulary chunked divergence
(opsd.core.losses). Prints a table (median seconds and ratio to full) and writes JSON.

    OMP_NUM_THREADS=2 python benchmarks/third_paper.py --rows 1024 --hidden 512 --vocab 32768 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from opsd.core.diagnostics import overlap_from_hidden
from opsd.core.estimators import support_divergence
from opsd.core.heads import LMHead
from opsd.core.losses import per_token_divergence


def _time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--chunk_size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    dev = torch.device(args.device)
    h_s = torch.randn(args.rows, args.hidden, generator=g).to(dev)
    h_t = torch.randn(args.rows, args.hidden, generator=g).to(dev)
    w_s = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).to(dev).requires_grad_()
    w_t = (torch.randn(args.vocab, args.hidden, generator=g) * 0.1).to(dev)
    ids = torch.randint(0, args.vocab, (args.rows,), generator=g).to(dev)
    s_head, t_head = LMHead(w_s), LMHead(w_t)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def full():
        h = h_s.clone().requires_grad_()
        per_token_divergence(h, s_head, h_t, t_head, 1.0, 1.0, "chunked", args.chunk_size)[0].sum().backward()
        sync()

    def estimator(support, cv="none"):
        def run():
            h = h_s.clone().requires_grad_()
            support_divergence(h, s_head, h_t, t_head, ids, support, args.k, 1.0, 1.0, cv,
                               args.chunk_size)[0].sum().backward()
            sync()
        return run

    def diagnostics():
        overlap_from_hidden(h_s, s_head, h_t, t_head, args.k, args.chunk_size)
        sync()

    variants = {"full (chunked, fwd+bwd)": full, "overlap diagnostics pass (no grad)": diagnostics}
    for support in ("student_topk", "teacher_topk", "intersection", "union", "sampled"):
        variants[f"{support} (fwd+bwd)"] = estimator(support)
    variants["sampled + vOPD full KL (fwd+bwd)"] = estimator("sampled", "full")
    results = {name: _time(fn, args.repeats) for name, fn in variants.items()}
    base = results["full (chunked, fwd+bwd)"]
    print(f"rows={args.rows} hidden={args.hidden} vocab={args.vocab} k={args.k} chunk={args.chunk_size} "
          f"device={args.device} threads={torch.get_num_threads()}")
    print("| variant | median s | x full |\n|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.3f} | {seconds / base:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "seconds": results, "ratio_to_full": {k: v / base
                                                                                   for k, v in results.items()}},
                      f, indent=2)


if __name__ == "__main__":
    main()
