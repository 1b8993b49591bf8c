"""Benchmark of one OPD loss step: `python -m lab.bench [--n 2048 8192 --h 1024 --v 32768 ...]`.

One loss step = (statistics pass + selection) + gradient pass over the kept rows + backward to the student's hidden
states and lm_head, on random hidden states and heads (no weights needed). Every variant calls the trainer's code
(`opsd.core.losses.weighted_divergence_loss`, `tip_ext.stats.token_stats_from_hidden`, `tip_ext.selectors.select`)
except `upstream_full`, which is the comparison point written out here. Compared in one run, each variant in a
fresh subprocess so that its peak memory is its own:

- `trl_full`       TRL's `ChunkedDivergenceFunction` on every row (Triton on CUDA, torch tiles elsewhere)
- `chunked_full`   this project's token-chunked recompute on every row (6 lm_head matmuls per row)
- `upstream_full`  upstream-style: 512-row chunks, full-vocabulary log-softmax kept by autograd for backward
- `fused_full`     the fused loss on every row (gradient computed in forward, 4 matmuls per row)
- `fused_frozen`   the same with the student's lm_head frozen (LoRA): only the hidden-state gradient is computed
- `<rule>@<rho>`   statistics pass (the statistics the rule needs) + `select` + the fused pass on the kept rows

Full-token variants run at every `--n` (memory growth), selective ones at the largest. Each variant runs one warm-up
and `--repeats` timed steps (median and min..max reported) with `--threads` intra-op threads (default 1, so ratios
stay meaningful on a shared machine); on CPU the time is the variant process's CPU time (`--clock`), which a shared
machine's load does not stretch the way it stretches elapsed time. Peak memory: CUDA max allocated above the inputs
on GPU, process peak RSS growth above the inputs on CPU (opsd.core.memory). Prints a table with ratios to `upstream_full` and `trl_full` at
the same N, checks the targets of issue 12, and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

DEFAULT_RULES = ("random", "entropy_sample", "soft_or", "q3", "teachability")
DEFAULT_RHOS = (0.5, 0.2, 0.1, 0.05)
FULL_VARIANTS = ("trl_full", "chunked_full", "upstream_full", "fused_full", "fused_frozen")
# issue 12's CPU targets: (variant, reference, max time ratio, max memory ratio)
TARGETS = (("fused_full", "upstream_full", 0.9, 0.3), ("@0.1", "upstream_full", 0.65, None),
           ("@0.1", "trl_full", 0.35, None))


def _inputs(n, h, v, dtype, device, frozen, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)  # noqa: E731
    h_s = make(n, h).requires_grad_()
    w_s = make(v, h, scale=h ** -0.5).requires_grad_(not frozen)
    h_t, w_t = make(n, h), make(v, h, scale=1.5 * h ** -0.5)
    seq = torch.arange(n, device=device) // 512  # rollouts of 512 tokens
    return h_s, w_s, h_t, w_t, seq


def _upstream_step(h_s, s_head, h_t, t_head):
    """Upstream-style reverse KL: per 512-row chunk, autograd keeps the full-vocabulary log-softmax for backward."""
    total = 0.0
    for start in range(0, h_s.shape[0], 512):
        log_ps = torch.log_softmax(s_head.logits(h_s[start:start + 512]), -1)
        with torch.no_grad():
            log_pt = torch.log_softmax(t_head.logits(h_t[start:start + 512]), -1)
        total = total + (log_ps.exp() * (log_ps - log_pt)).sum()
    return total / h_s.shape[0]


def loss_step(variant: str, chunk: int, h_s, w_s, h_t, w_t, seq, top_k: int) -> tuple[float, int]:
    """One loss step of `variant` with backward; returns (loss, rows in the gradient pass)."""
    from opsd.core.heads import LMHead
    from opsd.core.losses import weighted_divergence_loss

    s_head, t_head = LMHead(w_s), LMHead(w_t)
    n = h_s.shape[0]
    if variant == "upstream_full":
        loss, rows = _upstream_step(h_s, s_head, h_t, t_head), n
    elif variant.endswith(("_full", "_frozen")):
        backend = {"trl_full": "trl", "chunked_full": "chunked"}.get(variant, "fused")
        factors = torch.full((n,), 1.0 / n, device=h_s.device)
        loss, _, _ = weighted_divergence_loss(h_s, s_head, h_t, t_head, factors, 1.0, 1.0, backend, chunk)
        rows = n
    else:
        from tip_ext.selectors import needed_stats, select
        from tip_ext.stats import token_stats_from_hidden

        rule, rho = variant.split("@")
        names = needed_stats(rule)
        stats = {}
        if names:  # the trainer's statistics pass: no grad, student and teacher projections of every row
            stats = token_stats_from_hidden(h_s.detach(), LMHead(w_s.detach()), h_t, t_head, top_k=top_k,
                                            chunk_size=chunk, names=names)
        keep = select(rule, stats, float(rho), sequence_ids=seq, generator=torch.Generator().manual_seed(0)).keep
        index = keep.nonzero(as_tuple=True)[0].to(h_s.device)
        rows = index.numel()
        factors = torch.full((rows,), 1.0 / max(rows, 1), device=h_s.device)
        loss, _, _ = weighted_divergence_loss(h_s[index], s_head, h_t[index], t_head, factors, 1.0, 1.0, "fused",
                                              chunk)
    loss.backward()
    return loss.item(), rows


def _child(args) -> dict:
    from opsd.core.memory import PeakMemory

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    inputs = _inputs(args.child_n, args.h, args.v, getattr(torch, args.dtype), device, args.child == "fused_frozen")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    walls, cpus = [], []
    with PeakMemory(device) as peak:
        for i in range(args.repeats + 1):  # the first run is a warm-up
            for t in inputs[:2]:
                t.grad = None
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            loss, rows = loss_step(args.child, args.chunk_size, *inputs, top_k=args.top_k)
            sync()
            if i:
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
    times = cpus if args.clock == "cpu" else walls
    return {"variant": args.child, "n": args.child_n, "rows": rows, "time_s": statistics.median(times),
            "time_min_s": min(times), "time_max_s": max(times), "clock": args.clock, "wall_s": walls, "cpu_s": cpus,
            "peak_extra_gb": peak.extra_gb, "loss": loss}


def variants(args) -> list[tuple[str, int]]:
    out = [(v, n) for n in args.n for v in FULL_VARIANTS if v in args.full]
    out += [(f"{rule}@{rho:g}", max(args.n)) for rule in args.rules for rho in args.rhos]
    return out


def _ratios(results: list[dict]) -> None:
    by_key = {(r["variant"], r["n"]): r for r in results if "error" not in r}
    for r in results:
        if "error" in r:
            continue
        for ref_name, key in (("upstream_full", "vs_upstream"), ("trl_full", "vs_trl")):
            ref = by_key.get((ref_name, r["n"]))
            if ref:
                r[f"time_{key}"] = r["time_s"] / ref["time_s"]
                r[f"mem_{key}"] = r["peak_extra_gb"] / ref["peak_extra_gb"] if ref["peak_extra_gb"] > 0 else None


def check_targets(results: list[dict]) -> list[dict]:
    """Issue 12's targets at the largest N measured: each as {target, measured, met}."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return []
    n = max(r["n"] for r in ok)
    out = []
    for pattern, ref, max_time, max_mem in TARGETS:
        key = "vs_upstream" if ref == "upstream_full" else "vs_trl"
        rows = [r for r in ok if r["n"] == n and (r["variant"] == pattern or r["variant"].endswith(pattern))]
        rows = [r for r in rows if r["variant"].split("@")[0] != "random"]  # the target is for rules with a pass
        for r in rows:
            if r.get(f"time_{key}") is None:
                continue
            mem = r.get(f"mem_{key}")  # None: the reference's peak did not register (tiny shapes)
            met = r[f"time_{key}"] <= max_time and (max_mem is None or (mem is not None and mem <= max_mem))
            target = f"time <= {max_time}x {ref}" + (f", memory <= {max_mem}x" if max_mem else "")
            measured = f"time {r[f'time_{key}']:.2f}x" + (f", memory {_fmt(mem) or 'n/a'}x" if max_mem else "")
            out.append({"variant": r["variant"], "n": n, "target": target, "measured": measured, "met": met})
    return out



def run_child(cmd: list[str], timeout: float) -> tuple[dict | None, str | None]:
    """Run one measurement in its own process (its peak memory is its own): (the JSON of its `RESULT ` line,
    None), or (None, the error: the end of its stderr, or the timeout)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:g} s"
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return None, proc.stderr[-800:]
    return json.loads(line[len("RESULT "):]), None

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[2048, 8192],
                        help="tokens in the step; full-token variants run at each, selective ones at the largest")
    parser.add_argument("--h", type=int, default=1024, help="hidden size (student and teacher)")
    parser.add_argument("--v", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rhos", type=float, nargs="+", default=list(DEFAULT_RHOS))
    parser.add_argument("--rules", nargs="*", default=list(DEFAULT_RULES), help="selection rules (none: skip)")
    parser.add_argument("--full", nargs="*", default=list(FULL_VARIANTS), help=f"full-token variants {FULL_VARIANTS}")
    parser.add_argument("--chunk_size", type=int, default=512)
    parser.add_argument("--top_k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median, min..max)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per variant (0: torch's default)")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="what is timed: cpu = the variant process's CPU time (with 1 thread, stable on a shared "
                        "machine), wall = elapsed time; auto = cpu on CPU, wall on CUDA")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per variant before it is recorded as "
                        "an error")
    parser.add_argument("--out", default="bench_results.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child_n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clock == "auto":
        args.clock = "wall" if args.device.startswith("cuda") else "cpu"
    if args.child:
        print("RESULT " + json.dumps(_child(args)))
        return None
    if any(not 0 < r <= 1 for r in args.rhos):
        parser.error("--rhos must be in (0, 1]")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    unknown = sorted(set(args.full) - set(FULL_VARIANTS))
    if unknown:
        parser.error(f"--full: unknown variant(s) {unknown}; known: {list(FULL_VARIANTS)}")
    from tip_ext.selectors import needed_stats

    for rule in args.rules:
        try:
            needed_stats(rule)
        except ValueError as err:
            parser.error(f"--rules: {err}")
    results = []
    todo = variants(args)
    for i, (variant, n) in enumerate(todo, 1):
        cmd = [sys.executable, "-m", "lab.bench", "--child", variant, "--child_n", str(n), "--h", str(args.h),
               "--v", str(args.v), "--dtype", args.dtype, "--device", args.device, "--chunk_size",
               str(args.chunk_size), "--top_k", str(args.top_k), "--repeats", str(args.repeats), "--threads",
               str(args.threads), "--clock", args.clock]
        print(f"[{i}/{len(todo)}] {variant} N={n} ...", file=sys.stderr, flush=True)
        result, error = run_child(cmd, args.timeout)
        if error:
            print(error, file=sys.stderr)
            results.append({"variant": variant, "n": n, "error": error})
            _save(args.out, {"meta": {"partial": True}, "results": results})
            continue
        results.append(result)
        _save(args.out, {"meta": {"partial": True}, "results": results})  # a run stopped by a timeout keeps these
    _ratios(results)
    targets = check_targets(results)
    meta = {"n": args.n, "h": args.h, "v": args.v, "dtype": args.dtype, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name(),
            "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": args.repeats,
            "load_average": os.getloadavg(), "chunk_size": args.chunk_size, "clock": args.clock}
    _save(args.out, {"meta": meta, "results": results, "targets": targets})
    print(format_table(meta, results, targets))
    print(f"\nwrote {args.out}")
    return results


def _save(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return os.uname().machine


def _fmt(x, spec=".2f") -> str:
    return "" if x is None else format(x, spec)


def format_table(meta, results, targets=()) -> str:
    lines = [f"H={meta['h']} V={meta['v']} {meta['dtype']} on {meta['device']} ({meta['device_name']}), "
             f"{meta['threads']} thread(s), {meta['clock']} time, median of {meta['repeats']} after a warm-up "
             f"(min..max)",
             "| variant | N | rows | time (s) | min..max | / upstream | / TRL | peak extra (GB) | mem / upstream |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['n']} | | error: {r['error'].strip()[-60:]} | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['n']} | {r['rows']} | {r['time_s']:.2f} | {r['time_min_s']:.2f}.."
                     f"{r['time_max_s']:.2f} | {_fmt(r.get('time_vs_upstream'))} | {_fmt(r.get('time_vs_trl'))} | "
                     f"{r['peak_extra_gb']:.2f} | {_fmt(r.get('mem_vs_upstream'))} |")
    if targets:
        lines += ["", "| target (issue 12) | variant | measured | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['variant']} (N={t['n']}) | {t['measured']} | {'yes' if t['met'] else 'NO'} |"
                  for t in targets]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
