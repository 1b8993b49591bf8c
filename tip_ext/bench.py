"""Benchmark of one selective OPD loss step: `python -m tip_ext.bench [--n 4096 --h 1024 --v 32768 ...]`.

One loss step = (statistics pass + selection) + gradient pass over the kept rows + backward to the student's hidden
states and lm_head, on random hidden states and heads (no weights needed). Compared in one run, each variant in a
fresh subprocess so that its peak memory is its own:

- `trl_full`       TRL's stock full-token chunked loss (`ChunkedDivergenceFunction` on every row)
- `upstream_full`  upstream-style: 512-token chunks, full-vocabulary log-softmax kept by autograd for backward
- `opsd_full`      this project's full-token step (no statistics pass), `--backends` gradient pass
- `<rule>@<rho>`   statistics pass (the stats the rule needs) + `tip_ext.select` + gradient pass on kept rows

Prints a table (time, peak memory, both as ratios to `trl_full`) and writes JSON. Peak memory: CUDA max allocated
above the inputs on GPU; process peak RSS above the inputs on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

DEFAULT_RULES = ("random", "entropy_sample", "soft_or", "q3", "teachability")
DEFAULT_RHOS = (0.5, 0.2, 0.1, 0.05)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)  # noqa: E731
    h_s = make(n, h).requires_grad_()
    w_s = make(v, h, scale=h ** -0.5).requires_grad_()
    h_t, w_t = make(n, h), make(v, h, scale=1.5 * h ** -0.5)
    seq = torch.arange(n, device=device) // 512  # rollouts of 512 tokens
    return h_s, w_s, h_t, w_t, seq


def _step(variant: str, backend: str, chunk: int, h_s, w_s, h_t, w_t, seq, top_k: int):
    from opsd.core.heads import LMHead
    from opsd.core.losses import per_token_divergence

    s_head, t_head = LMHead(w_s), LMHead(w_t)
    if variant == "trl_full":
        div, _ = per_token_divergence(h_s, s_head, h_t, t_head, 1.0, backend="trl")
        loss = div.mean()
    elif variant == "upstream_full":
        total = 0.0
        for start in range(0, h_s.shape[0], 512):
            z_s = (h_s[start:start + 512] @ w_s.t()).float()
            z_t = (h_t[start:start + 512] @ w_t.t()).float()
            log_ps, log_pt = torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1)
            total = total + (log_ps.exp() * (log_ps - log_pt)).sum()
        loss = total / h_s.shape[0]
    elif variant == "opsd_full":
        div, _ = per_token_divergence(h_s, s_head, h_t, t_head, 1.0, backend=backend, chunk_size=chunk)
        loss = div.mean()
    else:
        from tip_ext.selectors import needed_stats, select
        from tip_ext.stats import token_stats_from_hidden

        rule, rho = variant.split("@")
        names = needed_stats(rule)
        stats = {}
        if names:
            stats = token_stats_from_hidden(h_s.detach(), s_head, h_t, t_head, top_k=top_k, chunk_size=chunk,
                                            names=names)
        keep = select(rule, stats, float(rho), sequence_ids=seq, generator=torch.Generator().manual_seed(0)).keep
        rows = keep.nonzero(as_tuple=True)[0].to(h_s.device)
        div, _ = per_token_divergence(h_s[rows], s_head, h_t[rows], t_head, 1.0, backend=backend, chunk_size=chunk)
        loss = div.sum() / max(rows.numel(), 1)
    loss.backward()
    return loss.item()


def _child(args) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    inputs = _inputs(args.n, args.h, args.v, dtype, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _peak_rss_gb() * 2**30
    times = []
    for i in range(args.repeats + 1):  # the first run is a warm-up
        for t in inputs[:2]:
            t.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = _step(args.child, args.backend, args.chunk_size, *inputs, top_k=args.top_k)
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_gb() * 2**30) - base
    return {"variant": args.child, "backend": args.backend, "time_s": min(times), "times_s": times,
            "peak_extra_gb": peak / 2**30, "loss": loss}


def _variants(args):
    out = [("trl_full", "trl"), ("upstream_full", "-")]
    out += [("opsd_full", b) for b in args.backends]
    out += [(f"{rule}@{rho}", b) for rule in args.rules for rho in args.rhos for b in args.backends]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tip_ext.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096, help="tokens in the step")
    parser.add_argument("--h", type=int, default=1024, help="hidden size (student and teacher)")
    parser.add_argument("--v", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rhos", type=float, nargs="+", default=list(DEFAULT_RHOS))
    parser.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES))
    parser.add_argument("--backends", nargs="+", default=None,
                        help="gradient-pass backends for opsd variants (default: chunked on CPU, trl and chunked on "
                             "CUDA)")
    parser.add_argument("--chunk_size", type=int, default=512)
    parser.add_argument("--top_k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up; the best is reported")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="bench_results.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="chunked", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args)))
        return None
    if args.backends is None:
        args.backends = ["trl", "chunked"] if args.device.startswith("cuda") else ["chunked"]
    if any(not 0 < r <= 1 for r in args.rhos):
        parser.error("--rhos must be in (0, 1]")
    results = []
    variants = _variants(args)
    for i, (variant, backend) in enumerate(variants, 1):
        cmd = [sys.executable, "-m", "tip_ext.bench", "--child", variant, "--backend", backend if backend != "-"
               else "chunked", "--n", str(args.n), "--h", str(args.h), "--v", str(args.v), "--dtype", args.dtype,
               "--device", args.device, "--chunk_size", str(args.chunk_size), "--top_k", str(args.top_k),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        print(f"[{i}/{len(variants)}] {variant} ({backend}) ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stderr[-2000:], file=sys.stderr)
            results.append({"variant": variant, "backend": backend, "error": proc.stderr[-500:]})
            continue
        result = json.loads(line[len("RESULT "):])
        result["backend"] = backend
        results.append(result)
    ref = next((r for r in results if r["variant"] == "trl_full" and "error" not in r), None)
    for r in results:
        if ref and "error" not in r:
            r["time_vs_trl"] = r["time_s"] / ref["time_s"]
            r["mem_vs_trl"] = r["peak_extra_gb"] / ref["peak_extra_gb"] if ref["peak_extra_gb"] > 0 else None
    meta = {"n": args.n, "h": args.h, "v": args.v, "dtype": args.dtype, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else os.uname().machine,
            "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(format_table(meta, results))
    print(f"\nwrote {args.out}")
    return results


def format_table(meta, results) -> str:
    lines = [f"N={meta['n']} H={meta['h']} V={meta['v']} {meta['dtype']} on {meta['device']} ({meta['device_name']}), "
             f"best of {meta['repeats']}",
             "| variant | backend | time (s) | time / TRL | peak extra (GB) | mem / TRL |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['backend']} | error | | | |")
            continue
        mem = r.get("mem_vs_trl")
        lines.append(f"| {r['variant']} | {r['backend']} | {r['time_s']:.2f} | {r.get('time_vs_trl', 0):.2f} | "
                     f"{r['peak_extra_gb']:.2f} | {'' if mem is None else f'{mem:.2f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
