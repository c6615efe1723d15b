"""model/sheets.py and model/curves.py, and bench/show.py, their command line:
view sheets of every view family on every installed pipeline, with drawn
boxes checked pixel by pixel against the plan; curves.png redrawn at each
epoch end, and a resumed run's curve without a gap."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipelines
import train
from configs import resolve_config
from model import curves, sheets
from model.methods import METHODS
from pipelines.data import open_source
from pipelines.render import decode

from tests.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[2]
# The view families: two views, multi-crop, mosaic with RoIs, SCRL pairs, the original.
FAMILIES = ["byol", "multicrop", "mosrep", "scrl", "leoclr"]
RENDERERS = sorted(set(pipelines.PIPELINES) - {"synthetic"})  # synthetic views come from no plan


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("show"), classes=2, per_class=6, size=(40, 30))
    return open_source(str(root), progress=False)


def config(method, *extra):
    cfg, _ = resolve_config(["--method", method, "--image-size", "24", *extra])
    return cfg


def render_png(tmp_path, cfg, source, names, samples=4):
    """(plan, PNG read back as an array, sheet) of epoch 0 step 0."""
    spec = METHODS[cfg.method].spec(cfg)
    sheet = sheets.sheet_for(cfg, spec, source, names, samples=samples)
    out = tmp_path / "sheet.png"
    sheet.image.save(out)
    batch = max(samples, spec.mosaic.crops_per_image if spec.mosaic else 1)
    plan = pipelines.build(names[0], spec, source, batch_size=batch, seed=cfg.seed, workers=0).planner.plan(0, 0)
    return plan, np.asarray(Image.open(out).convert("RGB")), sheet


def edge_points(panel, x0, y0, x1, y1):
    """Sheet pixels of the middle of each edge of a box [x0, x1) x [y0, y1) in
    its image's pixels, computed here from the plan's numbers, with the axis
    along which the 1 px tolerance applies."""
    s = panel.scale
    left, right = panel.x + x0 * s, panel.x + x1 * s - 1
    top, bottom = panel.y + y0 * s, panel.y + y1 * s - 1
    mx, my = (left + right) / 2, (top + bottom) / 2
    return [(left, my, "x"), (right, my, "x"), (mx, top, "y"), (mx, bottom, "y")]


def assert_box_drawn(png, panel, box, colour):
    for x, y, axis in edge_points(panel, *box):
        x, y = int(round(x)), int(round(y))
        near = [(x + d, y) if axis == "x" else (x, y + d) for d in (-1, 0, 1)]
        assert any(tuple(png[yy, xx]) == tuple(colour) for xx, yy in near), \
            f"no {colour} within 1 px of ({x}, {y}) for box {box} on {panel}"


def assert_panel_shows(png, panel, pixels):
    """The panel holds `pixels` enlarged by its whole-number scale."""
    s = int(panel.scale)
    assert s == panel.scale and s >= 1
    big = np.kron(pixels, np.ones((s, s, 1), np.uint8))
    h, w = big.shape[:2]
    np.testing.assert_array_equal(png[panel.y:panel.y + h, panel.x:panel.x + w], big)


@pytest.mark.parametrize("pipeline", RENDERERS)
@pytest.mark.parametrize("method", FAMILIES)
def test_sheet_of_every_view_family(tmp_path, source, method, pipeline):
    cfg = config(method)
    plan, png, sheet = render_png(tmp_path, cfg, source, [pipeline])
    batch = len(plan.index)

    # Every crop window on each source: the last one drawn lies on top, so its edges are whole.
    windows = [(cp, v) for cp in plan.crops.values() for v in range(cp.count)]
    if plan.mosaic is not None:
        windows += [(plan.mosaic.crops, v) for v in range(plan.mosaic.crops.count)]
    for b in range(batch):
        panel = sheet.panel("source", sample=b)
        cp, v = windows[-1]
        top, left, h, w = (int(t) for t in cp.window[v, b])
        assert_box_drawn(png, panel, (left, top, left + w, top + h), sheets.colour(len(windows) - 1))
        src = np.asarray(decode(source.read(int(plan.index[b]))))
        s = int(panel.scale)
        shown = png[panel.y:panel.y + src.shape[0] * s:s, panel.x:panel.x + src.shape[1] * s:s]
        assert (shown == src).all(axis=2).mean() > 0.5  # the source itself, under its boxes

    # Every view panel shows its view (no boxes drawn over views except SCRL's pairs).
    views = sheets.render_step(pipeline, METHODS[method].spec(cfg), source, batch_size=batch, seed=cfg.seed)[1]
    for name, fam in views.crops.items():
        for v in range(fam.shape[0]):
            panel = sheet.panel("view", sample=0, name=name, view=v)
            if plan.pairs is None:
                assert_panel_shows(png, panel, sheets.to_pixels(fam[v][0]))
    if plan.original is not None:
        assert_panel_shows(png, sheet.panel("original", sample=1), sheets.to_pixels(views.original[1]))

    if plan.mosaic is not None:  # every RoI, coloured by its source sample
        for j, (c, x0, y0, x1, y1) in enumerate(plan.mosaic.rois):
            panel = sheet.panel("mosaic", sample=int(c))
            assert_box_drawn(png, panel, (x0, y0, x1, y1), sheets.colour(int(plan.mosaic.src[j])))

    if plan.pairs is not None:  # the last pair of each image, on both views, in one colour
        fam = METHODS[method].spec(cfg).pairs.family
        for b in range(batch):
            k = int(plan.pairs.count[b])
            if k == 0:
                continue
            for v in (0, 1):
                rows = plan.pairs.boxes[v][plan.pairs.boxes[v][:, 0] == b]
                assert len(rows) == k
                assert_box_drawn(png, sheet.panel("view", sample=b, name=fam, view=v), rows[-1, 1:],
                                 sheets.colour(k - 1))
        assert plan.pairs.count.sum() > 0


@pytest.mark.skipif(len(RENDERERS) < 2, reason="needs two rendering pipelines")
@pytest.mark.parametrize("method", ["mosrep", "leoclr"])
def test_two_pipelines_side_by_side_with_differences(tmp_path, source, method):
    cfg = config(method)
    names = RENDERERS[:2]
    plan, png, sheet = render_png(tmp_path, cfg, source, names)
    spec = METHODS[method].spec(cfg)
    views = {n: sheets.render_step(n, spec, source, batch_size=len(plan.index), seed=cfg.seed)[1] for n in names}
    expected_keys = {(c.name, v, b) for c in spec.crops for v in range(c.count) for b in range(len(plan.index))}
    if spec.original is not None:
        expected_keys |= {("original", 0, b) for b in range(len(plan.index))}
    if spec.mosaic is not None:
        expected_keys |= {("mosaic", 0, c) for c in range(len(plan.index))}
    assert set(sheet.diffs) == expected_keys
    a, b = (sheets.to_pixels(views[n].crops["global"][1][2]).astype(np.int16) for n in names)
    d = np.abs(a - b)
    assert sheet.diffs[("global", 1, 2)] == pytest.approx(d.mean(), abs=1e-4)
    # the same plan: the views agree to a few levels on average (different resamplers), not by chance
    assert all(level < 8 for level in sheet.diffs.values()), sheet.diffs
    panel = sheet.panel("diff", name="global", view=1, sample=2)
    shown = np.clip(d.mean(axis=2) * sheets.DIFF_GAIN, 0, 255).astype(np.uint8)
    assert_panel_shows(png, panel, np.repeat(shown[..., None], 3, axis=2))
    for n in names:  # each pipeline's own panel of the same view
        assert_panel_shows(png, sheet.panel("view", pipeline=n, sample=2, name="global", view=1),
                           sheets.to_pixels(views[n].crops["global"][1][2]))


def test_views_command_writes_the_sheet_and_refuses_bad_input(tmp_path, labelled_folder):
    out = tmp_path / "v.png"
    cmd = [sys.executable, str(ROOT / "bench" / "show.py"), "views", "--method", "mosrep", "--data", str(labelled_folder),
           "--image-size", "24", "--pipelines", ",".join(RENDERERS[:2]), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size[0] > 200 and f"wrote {out}" in proc.stdout
    bad = subprocess.run(cmd[:-4] + ["--pipelines", "nosuch", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nosuch" in bad.stderr


def test_curve_series_keeps_the_resumed_records():
    records = [{"step": s, "epoch": 0, "loss": float(s), "lr": 0.1} for s in (1, 2, 3)]
    records += [{"step": 2, "epoch": 0, "loss": 20.0, "lr": 0.1}, {"step": 3, "epoch": 0, "loss": 30.0, "lr": 0.1},
                {"step": 3, "epoch": 0, "knn_top1": 0.5}, {"step": 3, "replica_digests": [1.0, 1.0]}]
    series = curves.curve_series(records)
    assert list(series["loss"][0]) == [1, 2, 3] and list(series["loss"][1]) == [1.0, 20.0, 30.0]
    assert list(series["knn_top1"][0]) == [3] and "replica_digests" not in series and "epoch" not in series


def test_curves_figure_draws_the_random_init_anchor_only_when_logged():
    records = [{"step": s, "epoch": 0, "loss": 5.0 - s, "lr": 0.1 * s, "img_s": 100.0, "loss_mos": 2.0,
                "acc": 0.1 * s} for s in (1, 2, 3)] + [{"step": 3, "epoch": 0, "knn_top1": 0.62}]
    for anchor in (None, 0.65):
        recs = records + ([{"step": 0, "knn_random": anchor}] if anchor else [])
        fig = curves.curves_figure(curves.curve_series(recs), "run")
        knn = next(ax for ax in fig.axes if ax.get_title().startswith("kNN"))
        lines = {line.get_label(): line for line in knn.get_lines()}
        assert list(lines["kNN top-1"].get_ydata()) == pytest.approx([62.0])
        if anchor:
            assert list(lines["random init"].get_ydata()) == pytest.approx([65.0, 65.0])
        else:
            assert "random init" not in lines
        loss = next(ax for ax in fig.axes if ax.get_title().startswith("loss"))
        assert {line.get_label() for line in loss.get_lines()} == {"loss", "loss_mos"}
        assert any(ax.get_title() == "method metrics" for ax in fig.axes)


TINY = ["--image-size", "16", "--batch-size", "8", "--arch", "resnet18", "--small-stem", "--workers", "0",
        "--log-every", "1", "--pipeline", "torchvision"]


def test_curves_redrawn_each_epoch_and_resumed_without_gap(labelled_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = ["--method", "simclr", "--data", str(labelled_folder), "--run-dir", str(run), "--epochs", "3",
            "--knn-every", "1", "--knn-k", "5", "--ckpt-every", "2", *TINY]
    drawn = []  # (loss steps in the log, bytes of curves.png) after each redraw
    real = curves.write_curves

    def spy(run_dir, out=None):
        path = real(run_dir, out)
        drawn.append((list(curves.curve_series(curves.read_log(Path(run_dir) / "log.jsonl"))["loss"][0]),
                      path.read_bytes()))
        return path
    monkeypatch.setattr(curves, "write_curves", spy)

    assert train.main([*args, "--stop-after", "9"]) == 0  # 6 steps an epoch: stops mid epoch 1
    assert len(drawn) == 1 and drawn[0][0] == list(range(1, 7))
    assert (run / "curves.png").read_bytes() == drawn[0][1]

    assert train.main(args) == 0  # resumes at the step-8 checkpoint and re-logs step 9
    assert len(drawn) == 3
    assert [d[0] for d in drawn[1:]] == [list(range(1, 13)), list(range(1, 19))]
    assert len({d[1] for d in drawn}) == 3  # a new picture each epoch
    logged = [json.loads(l)["step"] for l in (run / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(l)]
    assert logged.count(9) == 2  # the resumed run logged step 9 again; the curve holds it once
    assert Image.open(run / "curves.png").size[0] > 300
    knn = curves.curve_series(curves.read_log(run / "log.jsonl"))["knn_top1"]
    assert list(knn[0]) == [6, 12, 18]


@pytest.mark.skipif(not __import__("importlib").util.find_spec("tensorboard"), reason="needs tensorboard")
def test_tensorboard_gets_the_sheet_at_step_0_and_the_scalars(labelled_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    assert train.main(["--method", "mosrep", "--data", str(labelled_folder), "--run-dir", str(run), "--max-steps",
                       "2", "--knn-every", "0", "--tensorboard", "--queue-size", "32", *TINY]) == 0
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    images = acc.Images("views")
    assert [im.step for im in images] == [0] and images[0].width > 100
    assert {"loss", "lr", "img_s"} <= set(acc.Tags()["scalars"])
