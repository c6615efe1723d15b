"""Pictures of what the trainer does: the views a method gets, and a run's curves.

A sheet of one step's views (the plan of epoch 0, step 0, at a batch of 4):
    python bench/show.py views --method mosrep --out views.png
    python bench/show.py views --method scrl --pipelines dali,torchvision --out scrl.png   # same plan, each pipeline
Every train.py flag (--data, --image-size, --seed, --base byol, ...) resolves the method's views as a
training run would; the sheet's own flags are --pipelines, --out, --samples, --epoch, --step, --panel.
A run's curves (train.py redraws RUN_DIR/curves.png at every epoch end):
    python bench/show.py curves runs/mosrep-sample

The sheet shows, per sample: the source image with every crop window of the
plan drawn on it (one colour per window, legend underneath), every view
de-normalised and labelled with its family, size and the operations it got,
SCRL's matched boxes on both views (pair k in colour k on each), and the
original view; then the mosaic canvases with each RoI's box, coloured and
labelled by its source sample. With two pipelines each renders the same
plan, and every view appears as each made it, side by side, then their
absolute difference (amplified, with its mean level in 0..255 units).
Pixels are scaled by whole numbers (nearest neighbour) when they are
enlarged, so a box at x in an image sits at x * scale in its panel.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages sit beside bench/
    sys.path.insert(0, str(ROOT))

from pipelines.views import MEAN, STD  # noqa: E402

# Distinct colours (matplotlib's tab10 and a few more): crop windows, pairs and samples index into it.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (255, 255, 0), (0, 255, 255),
           (255, 0, 255), (128, 0, 0), (0, 0, 128), (0, 128, 0)]
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
DIFF_GAIN = 8  # difference images are amplified this much to be seen
LINE = 2       # box outline width, drawn inwards from the box's edge
LABEL_LINES = 2
PAD = 6


def colour(i: int) -> tuple:
    return PALETTE[i % len(PALETTE)]


def _font():
    return ImageFont.load_default()


# ----------------------------------------------------------------------------- one step's views
def render_step(pipeline: str, spec, source, *, batch_size: int, seed: int = 0, epoch: int = 0, step: int = 0,
                device="cpu", workers: int = 0, **options):
    """(plan, Views on the CPU) of step `step` of `epoch` rendered by `pipeline`."""
    import pipelines
    loader = pipelines.build(pipeline, spec, source, batch_size=batch_size, seed=seed, device=device,
                             workers=workers, **options)
    try:
        if not 0 <= step < len(loader):
            raise pipelines.PipelineError(f"step {step} outside the epoch's {len(loader)} steps at batch {batch_size}")
        loader.load_state_dict({"epoch": epoch, "step": step})
        it = iter(loader)
        views = next(it).to("cpu")
        it.close()
    finally:
        loader.close()
    return loader.planner.plan(epoch, step), views


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Normalised [C, H, W] -> uint8 [H, W, C] (the pipelines' normalisation undone)."""
    mean = torch.tensor(MEAN).view(3, 1, 1) * 255
    std = torch.tensor(STD).view(3, 1, 1) * 255
    return (x.float() * std + mean).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


@dataclass
class Panel:
    kind: str            # 'source', 'view', 'original', 'mosaic', 'diff'
    x: int               # top-left corner of the image in the sheet
    y: int
    scale: float         # sheet pixels per image pixel
    sample: int = -1     # batch index (canvas index for 'mosaic')
    pipeline: str = ""
    name: str = ""       # crop family, 'original' or 'mosaic'
    view: int = 0


@dataclass
class Sheet:
    image: Image.Image
    panels: list = field(default_factory=list)
    diffs: dict = field(default_factory=dict)  # (name, view, sample) -> mean |a - b| in 0..255 levels

    def panel(self, kind: str, **keys) -> Panel:
        for p in self.panels:
            if p.kind == kind and all(getattr(p, k) == v for k, v in keys.items()):
                return p
        raise KeyError((kind, keys))


def panel_scale(width: int, height: int, target: int) -> float:
    """Whole-number enlargement up to `target` px, else the reduction that fits."""
    side = max(width, height)
    return float(max(1, target // side)) if side <= target else target / side


def box_rect(panel: Panel, x0, y0, x1, y1) -> tuple:
    """Sheet pixels of a box [x0, x1) x [y0, y1) given in its image's pixels (ends exclusive)."""
    s = panel.scale
    return (panel.x + round(x0 * s), panel.y + round(y0 * s), panel.x + round(x1 * s) - 1, panel.y + round(y1 * s) - 1)


def _ops(plan, v: int, b: int) -> str:
    ops = []
    if plan.flip[v, b]:
        ops.append("flip")
    if plan.jitter[v, b]:
        ops.append("jit")
    if plan.gray[v, b]:
        ops.append("gray")
    if plan.sigma[v, b] > 0:
        ops.append(f"blur{plan.sigma[v, b]:.1f}")
    if plan.solarize[v, b]:
        ops.append("sol")
    return " ".join(ops) or "no op"


def view_sheet(plan, renders: dict, source, spec, *, title: str = "", panel: int = 96) -> Sheet:
    """The sheet of one step: `renders` maps pipeline name -> Views of `plan`
    (one or two pipelines; with two, each view is shown by both side by side,
    then their difference)."""
    from pipelines.torchvision import decode
    names = list(renders)
    two = len(names) > 1
    font = _font()
    line_h = font.getbbox("Ag")[3] + 3
    bar = 4  # the coloured bar over a view that ties it to its window on the source
    cell_w, cell_h = panel + PAD, bar + panel + LABEL_LINES * line_h + 2 + PAD
    gap = PAD if two else 0
    group_w = (len(names) + int(two)) * cell_w + gap  # one view: each pipeline's panel, then the difference
    batch = len(plan.index)
    families = [(c.name, c.count) for c in spec.crops]
    items = [(fam, v) for fam, n in families for v in range(n)]
    if plan.original is not None:
        items.append(("original", 0))
    width = PAD + cell_w + gap + len(items) * group_w
    per_row = 0
    if plan.mosaic is not None:
        per_row = max(1, min(batch, (width - PAD) // group_w))
        width = max(width, PAD + per_row * group_w)
    title_lines = [t for t in title.split("\n") if t]
    header_h = len(title_lines) * line_h + PAD
    height = header_h + batch * (line_h + cell_h)
    if per_row:
        height += line_h + math.ceil(batch / per_row) * cell_h
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    sheet = Sheet(img)
    for i, t in enumerate(title_lines):
        draw.text((PAD, PAD // 2 + i * line_h), t, fill=INK, font=font)

    def put(kind, pixels: np.ndarray, x, y, **keys) -> Panel:
        h, w = pixels.shape[:2]
        s = panel_scale(w, h, panel)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        im = Image.fromarray(pixels)
        im = im.resize(size, Image.NEAREST if s >= 1 else Image.BILINEAR)
        img.paste(im, (x, y + bar))
        p = Panel(kind, x, y + bar, s, **keys)
        sheet.panels.append(p)
        return p

    def label(x, y, lines, fill=INK):
        for i, t in enumerate(lines[:LABEL_LINES]):
            while t and font.getlength(t) > cell_w - 2:
                t = t[:-1]
            draw.text((x, y + bar + panel + 1 + i * line_h), t, fill=fill, font=font)

    def rect(p: Panel, box, fill):
        draw.rectangle(box_rect(p, *box), outline=fill, width=LINE)

    def diff_panel(a: np.ndarray, b: np.ndarray, x, y, key) -> None:
        d = np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.float32)
        mean = float(d.mean())
        sheet.diffs[key] = mean
        g = np.clip(d.mean(axis=2) * DIFF_GAIN, 0, 255).astype(np.uint8)
        put("diff", np.repeat(g[..., None], 3, axis=2), x, y, name=key[0], view=key[1], sample=key[2])
        label(x, y, [f"mean |d| {mean:.2f}", f"difference x{DIFF_GAIN}"])

    # Every crop window of a sample in drawing order: (tag, CropPlan, view); the tag names it in the legend.
    windows = [(f"{name[0]}{v}", plan.crops[name], v) for name, n in families for v in range(n)]
    if plan.mosaic is not None:
        windows += [(f"m{v}", plan.mosaic.crops, v) for v in range(plan.mosaic.crops.count)]
    pixels = {p: _pixels_of(renders[p]) for p in names}
    labels = getattr(source, "labels", None)
    classes = getattr(source, "classes", None) or []

    y = header_h
    for b in range(batch):
        idx = int(plan.index[b])
        lab = int(labels[idx]) if labels is not None and len(labels) else -1
        cls = f", {classes[lab]}" if 0 <= lab < len(classes) else ""
        draw.text((PAD, y), f"sample {b}: image #{idx}{cls}", fill=colour(b), font=font)
        y += line_h
        src = np.asarray(decode(source.read(idx)))
        p = put("source", src, PAD, y, sample=b)
        for i, (tag, cp, v) in enumerate(windows):
            top, left, h, w = (int(t) for t in cp.window[v, b])
            rect(p, (left, top, left + w, top + h), colour(i))
        label(PAD, y, [f"source {src.shape[1]}x{src.shape[0]}"])
        lx = PAD  # the legend: each window's tag in its colour
        for i, (tag, _, _) in enumerate(windows):
            if lx + font.getlength(tag) > PAD + cell_w - 2:
                break
            draw.text((lx, y + bar + panel + 1 + line_h), tag, fill=colour(i), font=font)
            lx += font.getlength(tag + " ")
        for g, (fam, v) in enumerate(items):
            x0 = PAD + cell_w + gap + g * group_w
            cp = plan.original if fam == "original" else plan.crops[fam]
            wi = next((i for i, (_, c, vv) in enumerate(windows) if c is cp and vv == v), None)
            for r, name in enumerate(names):
                x = x0 + r * cell_w
                if fam == "original":
                    put("original", pixels[name]["original"][b], x, y, sample=b, pipeline=name, name="original")
                    line1 = f"{name}: original" if two else f"original, {cp.size} px"
                else:
                    pv = put("view", pixels[name]["crops"][fam][v][b], x, y, sample=b, pipeline=name, name=fam,
                             view=v)
                    draw.rectangle((x, y, x + panel - 1, y + bar - 2), fill=colour(wi))
                    line1 = f"{name}: {fam} {v}" if two else f"{fam} {v}, {cp.size} px"
                    if spec.pairs is not None and fam == spec.pairs.family and v < 2:
                        pb = renders[name].pair_boxes[v].numpy()
                        for k, box in enumerate(pb[pb[:, 0] == b]):
                            rect(pv, box[1:], colour(k))
                label(x, y, [line1, _ops(cp, v, b)])
            if two:
                a, c = (pixels[nm]["original"][b] if fam == "original" else pixels[nm]["crops"][fam][v][b]
                        for nm in names[:2])
                diff_panel(a, c, x0 + len(names) * cell_w, y, (fam, v, b))
        y += cell_h

    if per_row:
        mp = plan.mosaic
        draw.text((PAD, y), f"mosaic canvases, {mp.canvas_size} px: each RoI's box coloured and labelled "
                            f"s<b> by its source sample b", fill=INK, font=font)
        y += line_h
        rois = {nm: renders[nm].mosaic_rois.numpy() for nm in names}
        srcs = {nm: renders[nm].mosaic_src.numpy() for nm in names}
        for c in range(batch):
            gr, gc = divmod(c, per_row)
            x0, ry = PAD + gc * group_w, y + gr * cell_h
            for r, name in enumerate(names):
                x = x0 + r * cell_w
                pm = put("mosaic", pixels[name]["mosaic"][c], x, ry, sample=c, pipeline=name, name="mosaic")
                sel = np.nonzero(rois[name][:, 0] == c)[0]
                for j in sel:
                    rect(pm, rois[name][j, 1:], colour(int(srcs[name][j])))
                for j in sel:  # labels after all boxes, at each box's centre (never on an edge)
                    x0b, y0b, x1b, y1b = box_rect(pm, *rois[name][j, 1:])
                    t = f"s{int(srcs[name][j])}"
                    tx = (x0b + x1b - font.getlength(t)) / 2
                    ty = (y0b + y1b - line_h) / 2
                    draw.rectangle((tx - 1, ty, tx + font.getlength(t), ty + line_h - 2), fill=BACKGROUND)
                    draw.text((tx, ty), t, fill=colour(int(srcs[name][j])), font=font)
                label(x, ry, [f"{name}: canvas {c}" if two else f"canvas {c}",
                              f"jitter {int(mp.shift[c, 0])},{int(mp.shift[c, 1])} px"])
            if two:
                a, b2 = (pixels[nm]["mosaic"][c] for nm in names[:2])
                diff_panel(a, b2, x0 + len(names) * cell_w, ry, ("mosaic", 0, c))
    return sheet


def _pixels_of(views) -> dict:
    out = {"crops": {k: [[to_pixels(x) for x in fam] for fam in t] for k, t in views.crops.items()}}
    if views.original is not None:
        out["original"] = [to_pixels(x) for x in views.original]
    if views.mosaic is not None:
        out["mosaic"] = [to_pixels(x) for x in views.mosaic]
    return out


def sheet_for(cfg, spec, source, pipeline_names, *, samples: int = 4, epoch: int = 0, step: int = 0,
              panel: int = 96, device="cpu") -> Sheet:
    """Render one step with each pipeline and draw its sheet."""
    batch = max(samples, spec.mosaic.crops_per_image if spec.mosaic is not None else 1)
    renders, plan = {}, None
    for name in pipeline_names:
        workers = 0 if name == "torchvision" else max(1, int(getattr(cfg, "workers", 1)))
        plan, renders[name] = render_step(name, spec, source, batch_size=batch, seed=cfg.seed, epoch=epoch,
                                          step=step, device=device, workers=workers,
                                          **pipelines.backend_options(name, cfg))
    title = (f"{cfg.method} on {', '.join(pipeline_names)}: epoch {epoch}, step {step}, seed {cfg.seed}, "
             f"batch {batch}, data {source.name}")
    return view_sheet(plan, renders, source, spec, title=title, panel=panel)


def add_views_to_tensorboard(writer, cfg, spec, source, device, samples: int = 4) -> None:
    """The sheet of epoch 0, step 0 (what the run's pipeline renders) as TensorBoard image 'views'."""
    sheet = sheet_for(cfg, spec, source, [cfg.pipeline], samples=samples, device=device)
    writer.add_image("views", np.asarray(sheet.image), 0, dataformats="HWC")


# ----------------------------------------------------------------------------- curves
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


# ----------------------------------------------------------------------------- command line
class _Usage(Exception):
    pass


def _views_command(argv: list) -> int:
    import pipelines
    import train
    from model.methods import METHODS
    from pipelines.data import DataError, open_source
    p = argparse.ArgumentParser(prog="bench/show.py views", description="a sheet of one step's views; other flags go "
                                "to train.py's configuration", add_help=True)
    p.add_argument("--pipelines", default=None, help="comma-separated; default: train.py's --pipeline")
    p.add_argument("--out", default="views.png")
    p.add_argument("--samples", type=int, default=4, help="batch of the step shown (at least a mosaic's crops)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--step", type=int, default=0)
    p.add_argument("--panel", type=int, default=96, help="panel side in pixels")
    own, rest = p.parse_known_args(argv)
    cfg, explicit = train.resolve_config(rest)
    names = [n for n in (own.pipelines or cfg.pipeline).split(",") if n]
    bad = [n for n in names if n not in pipelines.PIPELINES]
    if bad or not names or len(names) > 2:
        raise _Usage(f"--pipelines: give one or two of {', '.join(sorted(pipelines.PIPELINES))}"
                     + (f" (unknown: {', '.join(bad)})" if bad else ""))
    if own.samples < 1 or own.panel < 8:
        raise _Usage("--samples must be at least 1 and --panel at least 8")
    try:
        source = open_source(cfg.data, "train", progress=False)
    except DataError as e:
        raise _Usage(str(e))
    train.apply_small_profile(cfg, explicit, float(np.median(np.minimum(source.widths, source.heights))))
    spec = METHODS[cfg.method].spec(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        sheet = sheet_for(cfg, spec, source, names, samples=own.samples, epoch=own.epoch, step=own.step,
                          panel=own.panel, device=device)
    except pipelines.PipelineError as e:
        raise _Usage(str(e))
    sheet.image.save(own.out, optimize=True)
    if sheet.diffs:
        by_view = {}
        for (name, v, _), d in sheet.diffs.items():
            by_view.setdefault(f"{name} {v}", []).append(d)
        print(f"mean |{names[0]} - {names[1]}| per view (0..255): "
              + ", ".join(f"{k} {np.mean(d):.2f}" for k, d in by_view.items()))
    print(f"wrote {own.out} ({sheet.image.width}x{sheet.image.height})")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] not in ("views", "curves"):
            raise _Usage("usage: python bench/show.py views [--method M] [--pipelines a,b] [--out PNG] ... | "
                         "python bench/show.py curves RUN_DIR")
        if argv[0] == "views":
            return _views_command(argv[1:])
        if len(argv) != 2 or not (Path(argv[1]) / "log.jsonl").is_file():
            raise _Usage("usage: python bench/show.py curves RUN_DIR (a run directory holding log.jsonl)")
        print(f"wrote {write_curves(argv[1])}")
        return 0
    except _Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
