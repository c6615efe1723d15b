"""A run's curves: RUN_DIR/log.jsonl drawn into RUN_DIR/curves.png (loss and
the method's metric parts, learning rate, kNN top-1 against the random-init
anchor, images/s). The loop redraws it at every epoch end; `python
bench/show.py curves RUN_DIR` redraws it any time.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Log keys that are not a method's metric parts.
_NOT_METRICS = {"step", "epoch", "loss", "lr", "img_s", "knn_top1", "knn_random", "replica_digests"}


def read_log(path) -> list:
    """The records of log.jsonl; a half-written last line (a killed run) is skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def curve_series(records: list) -> dict:
    """key -> (steps, values) sorted by step. A resumed run re-logs the steps
    after its last checkpoint; the later record of a step wins, so the curve
    continues where the resumed run took over, without a gap or a doubling."""
    series = {}
    for rec in records:
        for k, v in rec.items():
            if k in ("step", "epoch") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            series.setdefault(k, {})[int(rec["step"])] = float(v)
    return {k: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)])) for k, d in series.items()}


def write_curves(run_dir, out=None) -> Path:
    """Draw loss (and the method's metric parts), learning rate, kNN top-1 and
    images/s from RUN_DIR/log.jsonl into RUN_DIR/curves.png (atomically)."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "curves.png"
    fig = curves_figure(curve_series(read_log(run_dir / "log.jsonl")), run_dir.name)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(out)
    return out


def curves_figure(series: dict, title: str):
    """The curves of `curve_series` output as a matplotlib Figure (no pyplot state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    parts = sorted(k for k in series if k not in _NOT_METRICS)
    loss_parts = [k for k in parts if k.startswith("loss")]
    other_parts = [k for k in parts if k not in loss_parts]  # e.g. a method's contrastive accuracies
    cols = 3 if other_parts else 2
    fig = Figure(figsize=(4.5 * cols, 6), dpi=80)
    axes = fig.subplots(2, cols)
    if cols == 3:
        axes[1, 2].remove()
    ax = axes[0, 0]
    for k in ["loss"] + loss_parts:
        if k in series:
            ax.plot(*series[k], label=k, lw=1.2 if k == "loss" else 0.8)
    ax.set_title("loss" + (" and its parts" if loss_parts else ""))
    if loss_parts:
        ax.legend(fontsize=7)
    if other_parts:
        ax = axes[0, 2]
        for k in other_parts:
            ax.plot(*series[k], label=k, lw=0.8)
        ax.set_title("method metrics")
        ax.legend(fontsize=7)
    for ax, key, name in ((axes[0, 1], "lr", "learning rate"), (axes[1, 1], "img_s", "images/s")):
        if key in series:
            ax.plot(*series[key], lw=1)
        ax.set_title(name)
    ax = axes[1, 0]
    if "knn_top1" in series:
        s, v = series["knn_top1"]
        ax.plot(s, v * 100, marker="o", lw=1, label="kNN top-1")
    else:
        ax.text(0.5, 0.5, "no kNN result logged yet", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    if "knn_random" in series:  # a random-init anchor, drawn only when the log has one (key knn_random)
        ax.axhline(series["knn_random"][1][-1] * 100, color="grey", ls="--", lw=1, label="random init")
    ax.set_title("kNN top-1 (%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    steps = [s for key, (s, _) in series.items() if key in ("loss", "knn_top1") and len(s)]
    lo, hi = (min(s.min() for s in steps), max(s.max() for s in steps)) if steps else (0, 1)
    for ax in fig.axes:  # one step axis for every panel, so a lone kNN point sits at its step
        ax.set_xlim(lo - 0.5, hi + 0.5)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
