"""throughput.py's PNG: one panel per part that ran (the main rows on a log
scale, the CPU recipes against the stock pipelines, host memory by epoch,
each sweep), titled with the device, versions and date."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.measure import samples_per_s

SWEEP_AXES = {"batch": "batch size", "views": "views per image", "size": "view size (px)",
              "workers": "DALI threads / loader workers"}


def plot(result: dict, path: Path) -> None:
    """One PNG: a panel per part that ran. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    main = [r for r in result.get("rows", []) if "pipeline_only" in r]
    if main:
        panels.append("main")
    if any(r["status"] == "ok" for r in result.get("recipes", [])):
        panels.append("recipes")
    if any(r["status"] == "ok" for r in result.get("rss", [])):
        panels.append("rss")
    panels += [f"sweep:{k}" for k in result.get("sweeps", {})]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 4.8), squeeze=False)
    axes = axes[0]
    env = result["environment"]
    fig.suptitle(f"viewforge throughput on {env['device_name']} ({env['cpu_count']} CPUs), "
                 f"torch {env['versions']['torch']}, DALI {env['versions']['dali']}, {env['date'][:10]}", fontsize=9)
    for ax, panel in zip(axes, panels):
        if panel == "main":
            main_panel(ax, main, result["settings"])
        elif panel == "recipes":
            recipes_panel(ax, [r for r in result["recipes"] if r["status"] == "ok"])
        elif panel == "rss":
            rss_panel(ax, result["rss"])
        else:
            kind = panel.split(":", 1)[1]
            sweep_panel(ax, kind, [r for r in result["sweeps"][kind] if r["status"] == "ok"])
    if not panels:
        axes[0].text(0.5, 0.5, "nothing measured", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_panel(ax, rows: list, settings: dict) -> None:
    """Pipeline only, model only and end to end of each (method, pipeline)."""
    labels = [f"{r['method']}\n{r['pipeline']}" for r in rows]
    x = np.arange(len(rows))
    for k, (part, name) in enumerate([("pipeline_only", "pipeline only"), ("model_only", "model only"),
                                      ("end_to_end", "end to end")]):
        values = [samples_per_s(r[part]) or 0 for r in rows]
        bars = ax.bar(x + (k - 1) * 0.27, values, 0.27, label=name)
        ax.bar_label(bars, [f"{v:.3g}" if v else "" for v in values], fontsize=6)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_yscale("log")  # pipelines and models differ by orders of magnitude
    ax.set_ylabel("samples/s (log)")
    ax.set_title(f"batch {settings['batch_size']}, {settings['workers']} workers, {settings['arch']}", fontsize=9)
    ax.legend(fontsize=7)


def recipe_label(row) -> str:
    """A recipe bar's label: samples/s, and for ours the speed-up over the best stock pipeline."""
    if row is None:
        return ""
    text = f"{row['samples_per_s']:.3g}"
    if not row.get("baseline") and row.get("speedup_vs_best_baseline"):
        text += f"\n{row['speedup_vs_best_baseline']:.2f}x stock"
        if row.get("target"):
            text += f" (>= {row['target']:.1f}x)"
    return text


def recipes_panel(ax, rows: list) -> None:
    """Samples/s per recipe, a bar per pipeline (ours and the stock ones)."""
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    pipes = list(dict.fromkeys(r["pipeline"] for r in rows))
    x = np.arange(len(recipes))
    width = 0.8 / max(1, len(pipes))
    for k, pipe in enumerate(pipes):
        got = {r["recipe"]: r for r in rows if r["pipeline"] == pipe}
        bars = ax.bar(x + k * width - 0.4 + width / 2, [got[n]["samples_per_s"] if n in got else 0
                                                        for n in recipes], width, label=pipe)
        ax.bar_label(bars, [recipe_label(got.get(n)) for n in recipes], fontsize=6)
    ax.set_xticks(x, recipes)
    ax.margins(y=0.2)
    ax.set_ylabel("samples/s")
    ax.set_title(f"CPU recipes, batch {rows[0]['batch_size']}, {rows[0]['workers']} workers", fontsize=9)
    ax.legend(fontsize=7)


def rss_panel(ax, rows: list) -> None:
    for r in rows:
        if r["status"] == "ok":
            ax.plot(range(1, len(r["total_mb"]) + 1), r["total_mb"], marker="o", label=r["pipeline"])
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("host MB (PSS, process + workers)")
    ax.set_title("host memory at epoch ends", fontsize=9)
    ax.legend(fontsize=7)


def sweep_panel(ax, kind: str, rows: list) -> None:
    for pipe in dict.fromkeys(r["pipeline"] for r in rows):
        pts = [r for r in rows if r["pipeline"] == pipe]
        xs = [r["views_per_sample"] if kind == "views" else r["value"] for r in pts]
        ax.plot(xs, [r["samples_per_s"] for r in pts], marker="o", label=pipe)
    ax.set_xlabel(SWEEP_AXES[kind])
    ax.set_ylabel("images/s (samples/s)")
    ax.set_title(f"sweep: {kind}, pipeline only", fontsize=9)
    ax.legend(fontsize=7)
