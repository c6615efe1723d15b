"""Pictures of one step's views: the view sheet (bench/show.py views draws
it on demand; the loop writes the sheet of step 0 to TensorBoard).

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

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import pipelines
from pipelines.render import decode  # the source image as the reference pipeline decodes it
from pipelines.views import MEAN, STD

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


class _Drawing:
    """One step's sheet being drawn: the step (plan, each pipeline's Views,
    the source) and the geometry. A view is a cell: a coloured bar, the
    panel (`panel` px at most), LABEL_LINES of text; a group is one view as
    each pipeline made it, then (with two) their difference."""
    BAR = 4  # the coloured bar over a view that ties it to its window on the source

    def __init__(self, plan, renders: dict, source, spec, panel: int):
        self.plan, self.renders, self.source, self.spec, self.panel = plan, renders, source, spec, panel
        self.names = list(renders)
        self.two = len(self.names) > 1
        self.pixels = {p: _pixels_of(renders[p]) for p in self.names}
        self.font = _font()
        self.line_h = self.font.getbbox("Ag")[3] + 3
        self.cell_w, self.cell_h = panel + PAD, self.BAR + panel + LABEL_LINES * self.line_h + 2 + PAD
        self.gap = PAD if self.two else 0
        self.group_w = (len(self.names) + int(self.two)) * self.cell_w + self.gap
        families = [(c.name, c.count) for c in spec.crops]
        self.items = [(fam, v) for fam, n in families for v in range(n)]  # the view groups of a sample's row
        if plan.original is not None:
            self.items.append(("original", 0))
        # Every crop window of a sample in drawing order: (tag, CropPlan, view); the tag names it in the legend.
        self.windows = [(f"{name[0]}{v}", plan.crops[name], v) for name, n in families for v in range(n)]
        if plan.mosaic is not None:
            self.windows += [(f"m{v}", plan.mosaic.crops, v) for v in range(plan.mosaic.crops.count)]
        self.sheet = self.draw = None

    def start(self, width: int, height: int) -> Sheet:
        self.sheet = Sheet(Image.new("RGB", (width, height), BACKGROUND))
        self.draw = ImageDraw.Draw(self.sheet.image)
        return self.sheet

    def text(self, xy, t: str, fill=INK) -> None:
        self.draw.text(xy, t, fill=fill, font=self.font)

    def put(self, kind, pixels: np.ndarray, x, y, **keys) -> Panel:
        h, w = pixels.shape[:2]
        s = panel_scale(w, h, self.panel)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        im = Image.fromarray(pixels).resize(size, Image.NEAREST if s >= 1 else Image.BILINEAR)
        self.sheet.image.paste(im, (x, y + self.BAR))
        p = Panel(kind, x, y + self.BAR, s, **keys)
        self.sheet.panels.append(p)
        return p

    def label(self, x, y, lines) -> None:
        for i, t in enumerate(lines[:LABEL_LINES]):
            while t and self.font.getlength(t) > self.cell_w - 2:
                t = t[:-1]
            self.text((x, y + self.BAR + self.panel + 1 + i * self.line_h), t)

    def rect(self, p: Panel, box, fill) -> None:
        self.draw.rectangle(box_rect(p, *box), outline=fill, width=LINE)

    def diff_panel(self, a: np.ndarray, b: np.ndarray, x, y, key) -> None:
        d = np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.float32)
        mean = float(d.mean())
        self.sheet.diffs[key] = mean
        g = np.clip(d.mean(axis=2) * DIFF_GAIN, 0, 255).astype(np.uint8)
        self.put("diff", np.repeat(g[..., None], 3, axis=2), x, y, name=key[0], view=key[1], sample=key[2])
        self.label(x, y, [f"mean |d| {mean:.2f}", f"difference x{DIFF_GAIN}"])

    def sample_row(self, b: int, y: int) -> int:
        """Sample b's row from height y: its source with every window, then its views; the next row's y."""
        idx = int(self.plan.index[b])
        labels = getattr(self.source, "labels", None)
        classes = getattr(self.source, "classes", None) or []
        lab = int(labels[idx]) if labels is not None and len(labels) else -1
        cls = f", {classes[lab]}" if 0 <= lab < len(classes) else ""
        self.text((PAD, y), f"sample {b}: image #{idx}{cls}", fill=colour(b))
        y += self.line_h
        src = np.asarray(decode(self.source.read(idx)))
        p = self.put("source", src, PAD, y, sample=b)
        for i, (tag, cp, v) in enumerate(self.windows):
            top, left, h, w = (int(t) for t in cp.window[v, b])
            self.rect(p, (left, top, left + w, top + h), colour(i))
        self.label(PAD, y, [f"source {src.shape[1]}x{src.shape[0]}"])
        lx = PAD  # the legend: each window's tag in its colour
        for i, (tag, _, _) in enumerate(self.windows):
            if lx + self.font.getlength(tag) > PAD + self.cell_w - 2:
                break
            self.text((lx, y + self.BAR + self.panel + 1 + self.line_h), tag, fill=colour(i))
            lx += self.font.getlength(tag + " ")
        for g, (fam, v) in enumerate(self.items):
            self.view_group(b, fam, v, PAD + self.cell_w + self.gap + g * self.group_w, y)
        return y + self.cell_h

    def view_group(self, b: int, fam: str, v: int, x0: int, y: int) -> None:
        """View v of family `fam` of sample b as each pipeline made it (SCRL's pairs drawn on), then the difference."""
        cp = self.plan.original if fam == "original" else self.plan.crops[fam]
        wi = next((i for i, (_, c, vv) in enumerate(self.windows) if c is cp and vv == v), None)
        for r, name in enumerate(self.names):
            x = x0 + r * self.cell_w
            if fam == "original":
                self.put("original", self.pixels[name]["original"][b], x, y, sample=b, pipeline=name, name="original")
                line1 = f"{name}: original" if self.two else f"original, {cp.size} px"
            else:
                pv = self.put("view", self.pixels[name]["crops"][fam][v][b], x, y, sample=b, pipeline=name,
                              name=fam, view=v)
                self.draw.rectangle((x, y, x + self.panel - 1, y + self.BAR - 2), fill=colour(wi))
                line1 = f"{name}: {fam} {v}" if self.two else f"{fam} {v}, {cp.size} px"
                if self.spec.pairs is not None and fam == self.spec.pairs.family and v < 2:
                    pb = self.renders[name].pair_boxes[v].numpy()
                    for k, box in enumerate(pb[pb[:, 0] == b]):
                        self.rect(pv, box[1:], colour(k))
            self.label(x, y, [line1, _ops(cp, v, b)])
        if self.two:
            a, c = (self.pixels[nm]["original"][b] if fam == "original" else self.pixels[nm]["crops"][fam][v][b]
                    for nm in self.names[:2])
            self.diff_panel(a, c, x0 + len(self.names) * self.cell_w, y, (fam, v, b))

    def mosaics(self, y: int, per_row: int) -> None:
        """The mosaic canvases from height y, `per_row` groups a row: each RoI's box coloured by its source sample."""
        mp = self.plan.mosaic
        self.text((PAD, y), f"mosaic canvases, {mp.canvas_size} px: each RoI's box coloured and labelled "
                            f"s<b> by its source sample b")
        y += self.line_h
        for c in range(len(self.plan.index)):
            gr, gc = divmod(c, per_row)
            x0, ry = PAD + gc * self.group_w, y + gr * self.cell_h
            for r, name in enumerate(self.names):
                self.canvas(c, name, x0 + r * self.cell_w, ry)
            if self.two:
                a, b2 = (self.pixels[nm]["mosaic"][c] for nm in self.names[:2])
                self.diff_panel(a, b2, x0 + len(self.names) * self.cell_w, ry, ("mosaic", 0, c))

    def canvas(self, c: int, name: str, x: int, y: int) -> None:
        """Canvas c as pipeline `name` made it, with its RoIs' boxes, each labelled s<b> at its centre."""
        rois, srcs = self.renders[name].mosaic_rois.numpy(), self.renders[name].mosaic_src.numpy()
        pm = self.put("mosaic", self.pixels[name]["mosaic"][c], x, y, sample=c, pipeline=name, name="mosaic")
        sel = np.nonzero(rois[:, 0] == c)[0]
        for j in sel:
            self.rect(pm, rois[j, 1:], colour(int(srcs[j])))
        for j in sel:  # labels after all boxes, at each box's centre (never on an edge)
            x0b, y0b, x1b, y1b = box_rect(pm, *rois[j, 1:])
            t = f"s{int(srcs[j])}"
            tx = (x0b + x1b - self.font.getlength(t)) / 2
            ty = (y0b + y1b - self.line_h) / 2
            self.draw.rectangle((tx - 1, ty, tx + self.font.getlength(t), ty + self.line_h - 2), fill=BACKGROUND)
            self.text((tx, ty), t, fill=colour(int(srcs[j])))
        shift = self.plan.mosaic.shift
        self.label(x, y, [f"{name}: canvas {c}" if self.two else f"canvas {c}",
                          f"jitter {int(shift[c, 0])},{int(shift[c, 1])} px"])


def view_sheet(plan, renders: dict, source, spec, *, title: str = "", panel: int = 96) -> Sheet:
    """The sheet of one step: `renders` maps pipeline name -> Views of `plan`
    (one or two pipelines; with two, each view is shown by both side by side,
    then their difference)."""
    d = _Drawing(plan, renders, source, spec, panel)
    batch = len(plan.index)
    width = PAD + d.cell_w + d.gap + len(d.items) * d.group_w
    per_row = 0
    if plan.mosaic is not None:
        per_row = max(1, min(batch, (width - PAD) // d.group_w))
        width = max(width, PAD + per_row * d.group_w)
    title_lines = [t for t in title.split("\n") if t]
    header_h = len(title_lines) * d.line_h + PAD
    height = header_h + batch * (d.line_h + d.cell_h)
    if per_row:
        height += d.line_h + math.ceil(batch / per_row) * d.cell_h
    sheet = d.start(width, height)
    for i, t in enumerate(title_lines):
        d.text((PAD, PAD // 2 + i * d.line_h), t)
    y = header_h
    for b in range(batch):
        y = d.sample_row(b, y)
    if per_row:
        d.mosaics(y, per_row)
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
        # one step: the reference renders it in this process (no workers to start); the others need a thread
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
