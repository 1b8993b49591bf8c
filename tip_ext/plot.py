"""`python -m tip_ext.plot DUMP_DIR [--out plane.png] [--step S]`: the student-entropy x divergence plane of a token
dump (written with --token_dump_dir), with the census thresholds (per-step quantile) and the kept tokens.

`python -m tip_ext.plot --overlap RUN_DIR [--out overlap.png]`: the overlap diagnostics (overlap/*, logged by a
selector's census or by opsd's --overlap_diagnostics) over training steps, one line per response third, from the
run's run_summary.json: progressive alignment shows as rising curves, depth decay as a gap between the thirds."""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np


def load_dump(directory: str, step: int | None = None):
    import pandas as pd

    files = sorted(glob.glob(os.path.join(directory, "tokens_step*.parquet")))
    if not files:
        raise FileNotFoundError(f"No token dump (tokens_step*.parquet) in {directory!r}: train with --token_dump_dir.")
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if step is not None:
        frame = frame[frame["step"] == step]
        if frame.empty:
            raise ValueError(f"Step {step} is not in the dump of {directory!r}.")
    return frame


def plot_plane(frame, out: str, quantile: float = 0.5, title: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not {"entropy_norm", "reverse_kl", "kept"} <= set(frame.columns):
        raise ValueError("The dump lacks entropy_norm / reverse_kl: train with census enabled (the default).")
    h, d, kept = frame["entropy_norm"].to_numpy(), frame["reverse_kl"].to_numpy(), frame["kept"].to_numpy()
    d_plot = np.maximum(d, 1e-8)
    th, td = np.quantile(h, quantile), np.quantile(d, quantile)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    ax.scatter(h[~kept], d_plot[~kept], s=4, alpha=0.35, color="0.6", label=f"dropped ({(~kept).sum()})")
    ax.scatter(h[kept], d_plot[kept], s=5, alpha=0.7, color="tab:red", label=f"kept ({kept.sum()})")
    ax.axvline(th, color="k", lw=0.8, ls="--")
    ax.axhline(max(td, 1e-8), color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("student entropy / ln|V|")
    ax.set_ylabel("KL(student || teacher)")
    for text, x, y in (("Q1", 0.98, 0.98), ("Q2", 0.98, 0.02), ("Q3", 0.02, 0.98), ("Q4", 0.02, 0.02)):
        ax.text(x, y, text, transform=ax.transAxes, ha="right" if x > 0.5 else "left",
                va="top" if y > 0.5 else "bottom", fontsize=11, weight="bold")
    ax.set_title(title or f"{len(h)} tokens, thresholds at the {quantile:.0%} quantile")
    ax.legend(loc="lower center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


OVERLAP_PANELS = (("teacher_mass", "P_T(S_K n T_K)"), ("student_mass", "P_S(S_K n T_K)"),
                  ("ratio", "|S_K n T_K| / K"), ("entropy_gap", "H(P_S) - H(P_T)"))


def plot_overlap(run_dir: str, out: str) -> str:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(run_dir, "run_summary.json")) as f:
        history = [h for h in json.load(f).get("log_history", []) if "overlap/ratio" in h]
    if not history:
        raise ValueError(f"{run_dir}: no overlap/* metrics in run_summary.json: train with a selector (census on) "
                         "or with --overlap_diagnostics true.")
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, len(OVERLAP_PANELS), figsize=(4 * len(OVERLAP_PANELS), 3.4), dpi=110)
    for ax, (name, label) in zip(axes, OVERLAP_PANELS):
        for suffix, style in (("", "k-"), ("/first", "C0--"), ("/middle", "C1--"), ("/last", "C3--")):
            key = f"overlap/{name}{suffix}"
            ax.plot(steps, [h.get(key, np.nan) for h in history], style, lw=1.2, label=suffix.strip("/") or "all")
        ax.set_title(label)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tip_ext.plot", description=__doc__)
    parser.add_argument("dump_dir", help="token dump directory, or with --overlap a run directory")
    parser.add_argument("--overlap", action="store_true", help="plot the overlap diagnostics of a run instead")
    parser.add_argument("--out", default=None, help="PNG path (default: DUMP_DIR/plane.png)")
    parser.add_argument("--step", type=int, default=None, help="only this optimizer step (default: all)")
    parser.add_argument("--quantile", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.overlap:
        out = plot_overlap(args.dump_dir, args.out or os.path.join(args.dump_dir, "overlap.png"))
        print(f"wrote {out}")
        return out
    out = plot_plane(load_dump(args.dump_dir, args.step), args.out or os.path.join(args.dump_dir, "plane.png"),
                     args.quantile)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
