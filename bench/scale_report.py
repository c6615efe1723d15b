"""bench/scale.py's arithmetic and output: the growth exponent fitted on
log-log, the figures extrapolated to the table's sizes (each marked), the
markdown table and the log-log PNG.

A cost is a dict: its name, unit, `law` and measured points (n, value,
peak_mb, base_mb). The law says how a figure at an unmeasured N is made:

  fit     value(N) = value(N0) * (N / N0) ** exponent, the exponent fitted by
          least squares on log N, log value over the measured points, N0
          the measured point nearest N
  linear  exactly proportional to N by construction (bytes of an N-row
          array): value(N) = value(N0) * N / N0
  quadratic  proportional to N^2 by construction (every image against every
          image: CLIM's neighbour table): value(N) = value(N0) * (N / N0) ** 2
          from the measured point nearest N; the fitted exponent is shown
          beside it, lower at small N where fixed costs still weigh
  affine  a constant plus a part proportional to N by construction (a
          checkpoint: the model, then the bank's rows): the line through
          the two largest measured points
  flops   a formula, not a measurement (GPU seconds from FLOPs): every
          point is an estimate

Peak memory is extrapolated on the part above the process's memory before
the call (peak_mb - base_mb), then the base is added back: by the line
through the two largest points where the cost is linear or affine (the
call also builds what does not grow with N: a model, buffers), by the
cost's `peak_formula` {N: MB} where its peak is set by design (CLIM's
memory budget), else with its own fitted exponent.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

IMAGENET_1K, IMAGENET_21K = 1_281_167, 14_197_122
TABLE_SIZES = (10_000, 100_000, IMAGENET_1K, IMAGENET_21K)
MARK = {"measured": "", "extrapolated": " (ext.)", "estimated": " (est.)"}


def fit_exponent(ns, values) -> float | None:
    """The slope of log(value) on log(N), least squares; None with fewer
    than two distinct N or a value that is not positive."""
    pts = [(n, v) for n, v in zip(ns, values) if v is not None and v > 0 and n > 0]
    if len({n for n, _ in pts}) < 2:
        return None
    x, y = np.log([n for n, _ in pts]), np.log([v for _, v in pts])
    return float(np.polyfit(x, y, 1)[0])


def scaled(points: list, n: int, key, law: str, exponent: float | None) -> float | None:
    """key(point) at n from the measured points by `law` (see the module docstring)."""
    pts = sorted((p for p in points if key(p) is not None), key=lambda p: p["n"])
    if not pts:
        return None
    if law == "affine" and len(pts) >= 2:
        (n0, v0), (n1, v1) = [(p["n"], key(p)) for p in pts[-2:]]
        return v1 + (v1 - v0) / (n1 - n0) * (n - n1)
    near = min(pts, key=lambda p: abs(math.log(p["n"] / n)))
    power = {"linear": 1.0, "affine": 1.0, "quadratic": 2.0}.get(law, exponent)
    if power is None:
        return None
    return key(near) * (n / near["n"]) ** power


def extra_mb(p: dict) -> float | None:
    if p.get("peak_mb") is None:
        return None
    return max(p["peak_mb"] - (p.get("base_mb") or 0.0), 1e-3)


def finish(cost: dict, sizes=TABLE_SIZES) -> dict:
    """The cost with its exponents and every table size that was not
    measured added as an extrapolated point; points sorted by N."""
    measured = [dict(p, status=p.get("status", "measured")) for p in cost["points"]]
    ns = [p["n"] for p in measured]
    exponent = fit_exponent(ns, [p["value"] for p in measured])
    peak_exponent = fit_exponent(ns, [extra_mb(p) for p in measured])
    out = dict(cost, exponent=exponent, peak_exponent=peak_exponent, points=measured)
    if cost["law"] == "flops":
        return dict(out, points=sorted(measured, key=lambda p: p["n"]))
    got = set(ns)
    for n in sizes:
        if n in got:
            continue
        value = scaled(measured, n, lambda p: p["value"], cost["law"], exponent)
        extra = scaled(measured, n, extra_mb, "affine" if cost["law"] in ("linear", "affine") else "fit",
                       peak_exponent)
        if cost.get("peak_formula"):  # a peak set by design (a memory budget): its formula, not a fit
            extra = cost["peak_formula"][n]
        base = max(measured, key=lambda p: p["n"]).get("base_mb") if measured else None
        out["points"].append({"n": n, "value": value, "peak_mb": None if extra is None else extra + (base or 0.0),
                              "base_mb": base, "status": "extrapolated"})
    out["points"].sort(key=lambda p: p["n"])
    return out


def at(cost: dict, n: int) -> dict | None:
    return next((p for p in cost["points"] if p["n"] == n), None)


def cell(point: dict | None, what: str = "value") -> str:
    if point is None or point.get(what) is None:
        return "-"
    v = point[what]
    text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return text + MARK[point["status"]]


def short_n(n: int) -> str:
    return {IMAGENET_1K: "1.28M", IMAGENET_21K: "14.2M"}.get(n, f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k")


def peak_law(c: dict) -> str:
    """How the peak at an unmeasured N was made (finish)."""
    if c.get("peak_formula"):
        return "formula"
    return "affine" if c["law"] in ("linear", "affine") else "fit"


def markdown(costs: list, env: dict, notes: list, sizes=TABLE_SIZES) -> str:
    """The README-ready table: a row per cost (and one per peak memory), each
    table size, the fitted exponent; unmeasured figures marked."""
    head = "| cost | unit | " + " | ".join(f"N = {short_n(n)}" for n in sizes) + " | exponent | law |"
    lines = [head, "|" + "---|" * (len(sizes) + 4)]
    for c in costs:
        exp = "-" if c["exponent"] is None else f"{c['exponent']:.2f}"
        lines.append(f"| {c['cost']} | {c['unit']} | " + " | ".join(cell(at(c, n)) for n in sizes)
                     + f" | {exp} | {c['law']} |")
        if c.get("show_peak") and any(p.get("peak_mb") for p in c["points"]):
            pexp = "-" if c["peak_exponent"] is None else f"{c['peak_exponent']:.2f}"
            lines.append(f"| {c['cost']}: peak RSS | MB | " + " | ".join(cell(at(c, n), "peak_mb") for n in sizes)
                         + f" | {pexp} (above base) | {peak_law(c)} |")
    title = (f"Host-side costs against N on {env['device_name']} ({env['cpu_count']} CPUs), torch "
             f"{env['versions']['torch']}, {env['date'][:10]}: `{env['command']}`")
    return "\n".join([title, "", *lines, "", *[f"- {n}" for n in notes]]) + "\n"


def plot(costs: list, env: dict, path: Path) -> None:
    """Log-log: a line per cost through its measured (filled) and
    extrapolated or estimated (open) points, a panel per unit and one for
    the peak RSS. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(u, "value") for u in dict.fromkeys(c["unit"] for c in costs)]
    panels += [("peak RSS, MB", "peak_mb")] if any(c.get("show_peak") for c in costs) else []
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 4.8), squeeze=False)
    fig.suptitle(f"viewforge host-side costs against N on {env['device_name']} ({env['cpu_count']} CPUs), "
                 f"{env['date'][:10]}; open marks: extrapolated or estimated", fontsize=9)
    for ax, (unit, what) in zip(axes[0], panels):
        for c in costs:
            if (what == "value" and c["unit"] == unit) or (what == "peak_mb" and c.get("show_peak")):
                draw(ax, c, what)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (images)")
        ax.set_ylabel(unit)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw(ax, c: dict, what: str) -> None:
    pts = [p for p in c["points"] if p.get(what) is not None and p[what] > 0]
    if not pts:
        return
    exp = c["exponent"] if what == "value" else c["peak_exponent"]
    label = c["cost"] + ("" if exp is None else f" (N^{exp:.2f}{'' if what == 'value' else ' above base'})")
    line, = ax.plot([p["n"] for p in pts], [p[what] for p in pts], label=label, lw=1)
    for status, fill in (("measured", None), ("other", "none")):
        got = [p for p in pts if (p["status"] == "measured") == (status == "measured")]
        ax.plot([p["n"] for p in got], [p[what] for p in got], "o", mfc=fill, color=line.get_color())
