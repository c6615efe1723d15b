"""The FFCV pipeline's own parts: Pillow's resize re-implemented, the .beton
writer (command line, sizes, awkward files, atomic write, cache). The
contract and pixel tests run for FFCV in test_contract.py and test_render.py."""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ffcv")
from ffcv.reader import Reader  # noqa: E402

from pipelines import build  # noqa: E402
from pipelines.data import open_source  # noqa: E402
from pipelines.ffcv import ensure_beton, write_beton  # noqa: E402
from pipelines.ffcv_stage import resized_crop  # noqa: E402
from pipelines.render import decode  # noqa: E402
from pipelines.views import NO_AUG, OriginalSpec, ViewSpec  # noqa: E402
from tests.conftest import make_image_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_resized_crop_is_pillows_crop_then_resize():
    """Pillow's fixed-point bilinear resize, horizontal pass first. Pillow 13
    runs the vertical pass first for some shapes (a rule not reproduced
    here): then single pixels differ by one level."""
    rng = np.random.default_rng(0)
    mismatched = []
    image = rng.integers(0, 256, (57, 83, 3), dtype=np.uint8)
    image[:, :, 1] = np.arange(83)[None, :] * 3  # smooth and noisy channels alike
    pil = Image.fromarray(image)
    for _ in range(60):
        h, w = int(rng.integers(1, 58)), int(rng.integers(1, 84))
        top, left = int(rng.integers(0, 58 - h)), int(rng.integers(0, 84 - w))
        size, flip = int(rng.choice([1, 7, 16, 40, 120])), bool(rng.integers(2))
        out = np.empty((size, size, 3), np.uint8)
        resized_crop(image, top, left, h, w, out, flip)
        ref = pil.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
        if flip:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        diff = np.abs(out.astype(np.int16) - np.asarray(ref))
        assert diff.max() <= 1, f"window {(top, left, h, w)} -> {size}"
        mismatched.append(diff.any())
    assert sum(mismatched) <= len(mismatched) // 4


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A flat folder of images that need each kind of storage, and three broken files."""
    root = tmp_path_factory.mktemp("mixed")
    y, x = np.mgrid[0:45, 0:60]
    rgb = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)
    pil = Image.fromarray(rgb)
    pil.save(root / "plain.jpg", quality=90)
    pil.convert("L").save(root / "gray.jpg", quality=90)
    pil.convert("CMYK").save(root / "cmyk.jpg", quality=90)
    pil.save(root / "lossless.png")
    Image.fromarray(np.asarray(pil.convert("L")).astype(np.uint16) * 257).save(root / "gray16.png")
    pil.convert("P", palette=Image.ADAPTIVE).save(root / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    pil.save(root / "rotated.jpg", quality=90, exif=exif.tobytes())
    (root / "empty.jpg").write_bytes(b"")
    (root / "garbage.jpg").write_bytes(b"\xff\xd8 not really a jpeg" * 50)
    (root / "truncated.jpg").write_bytes((root / "plain.jpg").read_bytes()[:300])
    return root


def run_cli(*args, cache, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipelines.ffcv", "write", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "VIEWFORGE_CACHE": str(cache)})


def test_write_command_stores_every_readable_file_at_its_index_size(mixed, tmp_path):
    out = tmp_path / "out" / "mixed.beton"
    proc = run_cli("--data", str(mixed), "--out", str(out), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "7 images; skipped 3 unreadable (index) and 0 that failed to decode" in proc.stdout
    assert os.listdir(out.parent) == ["mixed.beton"]  # the temporary file was renamed, nothing left over
    source = open_source(str(mixed), cache_dir=str(tmp_path / "cache"), progress=False)
    meta = Reader(str(out)).metadata
    np.testing.assert_array_equal(meta["f1"], np.arange(7))  # each record's position in the source
    np.testing.assert_array_equal(meta["f0"]["width"], source.widths)  # EXIF orientation included
    np.testing.assert_array_equal(meta["f0"]["height"], source.heights)
    by_name = dict(zip((os.path.basename(p) for p in source.paths), meta["f0"]["mode"]))
    assert by_name["rotated.jpg"] == 0 and by_name["lossless.png"] == 1  # 0: JPEG, 1: raw pixels
    assert (by_name["rotated.jpg"], source.widths[source.paths.index(str(mixed / "rotated.jpg"))]) == (0, 45)


def test_written_images_decode_to_the_reference_pixels(mixed, tmp_path):
    """The whole image of each file, through FFCV, against PIL's decode:
    exact for kept JPEGs and raw images, JPEG loss for re-encoded ones."""
    source = open_source(str(mixed), cache_dir=str(tmp_path), progress=False)
    spec = ViewSpec(original=OriginalSpec(24, aug=NO_AUG))
    ffcv = build("ffcv", spec, source, batch_size=1, workers=1, cache_dir=str(tmp_path))
    tv = build("torchvision", spec, source, batch_size=1, workers=0)
    seen = set()
    for a, b in zip(ffcv, tv):
        name = os.path.basename(source.paths[int(a.index[0])])
        diff = (a.original - b.original).abs().max().item() * 0.229 * 255  # about levels
        exact = name in ("plain.jpg", "gray.jpg", "lossless.png", "gray16.png", "palette.png")
        assert diff <= (0.01 if exact else 12), (name, diff)
        seen.add(name)
    assert len(seen) == 7


def test_unwritable_target_is_one_line_and_exit_2(mixed, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli("--data", str(mixed), "--out", str(blocker / "x.beton"), cache=tmp_path / "cache")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()  # the index's own warning about the broken files comes first
    assert lines[-1].startswith("error: cannot write") and "Traceback" not in proc.stderr
    assert sum(line.startswith("error") for line in lines) == 1


def test_file_list_source_and_max_side(mixed, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{mixed / 'plain.jpg'} 0\n{mixed / 'rotated.jpg'} 1\n{mixed / 'lossless.png'} 0\n")
    source = open_source(str(listing), cache_dir=str(tmp_path), progress=False)
    out = tmp_path / "small.beton"
    counts = write_beton(source, out, max_side=30, workers=1)
    assert counts == {"written": 3, "skipped_index": 0, "skipped_write": 0}
    meta = Reader(str(out)).metadata["f0"]
    assert sorted(zip(meta["width"], meta["height"])) == [(22, 30), (30, 22), (30, 22)]  # 45 * 30 / 60 = 22.5: rint
    # the loader maps the plan's windows onto the shrunk images
    loader = build("ffcv", ViewSpec(original=OriginalSpec(8, aug=NO_AUG)), source, batch_size=3, workers=1,
                   beton=str(out), max_side=30)
    views = next(iter(loader))
    assert views.original.shape == (3, 3, 8, 8)
    loader.close()


def test_cached_beton_is_reused_until_a_file_changes(mixed, tmp_path, monkeypatch):
    source = open_source(str(mixed), cache_dir=str(tmp_path), progress=False)
    first = ensure_beton(source, cache_dir=str(tmp_path))
    stamp = first.stat().st_mtime_ns
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: (_ for _ in ()).throw(AssertionError(f"stat {p}"))
                        if str(p) in source.paths else real_stat(p, *a, **k))
    assert ensure_beton(source, cache_dir=str(tmp_path)) == first and first.stat().st_mtime_ns == stamp
    monkeypatch.undo()  # the stamp is the index's fingerprint: no file was stat-ed for it
    # A file touched in place: the index notices it with recheck (--recheck-data), and so does the stamp.
    os.utime(source.paths[0], ns=(1, 1))
    rechecked = open_source(str(mixed), cache_dir=str(tmp_path), progress=False, recheck=True)
    again = ensure_beton(rechecked, cache_dir=str(tmp_path))
    assert again == first and again.stat().st_mtime_ns != stamp


FFCV_PAGE = 1 << 23  # DatasetWriter's default page_size: FFCV refuses a record larger than a page


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """An ImageFolder of two classes of small JPEGs and one plain RGB JPEG
    larger than FFCV's default page: noise at quality 100, 2200 x 2200 px
    (about 9.6 MB), kept byte for byte by the writer."""
    root = make_image_folder(tmp_path_factory.mktemp("large"), classes=2, per_class=3, size=(40, 30))
    noise = np.random.default_rng(0).integers(0, 256, (2200, 2200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "class0" / "large.jpg", quality=100)
    assert (root / "class0" / "large.jpg").stat().st_size > FFCV_PAGE
    return root


def stored_bytes(beton, record: int) -> np.ndarray:
    """The bytes FFCV stored for `record` (its allocation in the file)."""
    table = Reader(str(beton)).alloc_table
    row = table[table["sample_id"] == record]
    assert len(row) == 1
    return np.fromfile(beton, np.uint8, count=int(row[0]["size"]), offset=int(row[0]["ptr"]))


def test_a_file_larger_than_ffcvs_page_is_written_and_read_back_exactly(large, tmp_path):
    """The page is the smallest power of two that holds the largest record
    (16 MiB for 9.6 MB); FFCV's default 8 MiB page made a worker raise and
    the write wait for ever (the command line runs with a timeout)."""
    cache = tmp_path / "cache"
    big = large / "class0" / "large.jpg"
    cli = tmp_path / "cli.beton"
    proc = run_cli("--data", str(large), "--out", str(cli), cache=cache, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "7 images; skipped 0 unreadable (index) and 0 that failed to decode" in proc.stdout
    source = open_source(str(large), cache_dir=str(cache), progress=False)
    api = tmp_path / "api.beton"
    assert write_beton(source, api, workers=2) == {"written": 7, "skipped_index": 0, "skipped_write": 0}
    k = source.paths.index(str(big))
    for beton in (cli, api):
        reader = Reader(str(beton))
        assert reader.page_size == 1 << 24
        np.testing.assert_array_equal(reader.metadata["f1"], np.arange(7))
        assert reader.metadata["f0"]["mode"][k] == 0  # a JPEG: its own bytes
        np.testing.assert_array_equal(stored_bytes(beton, k), np.fromfile(big, np.uint8))
    # through the loader (its own cached .beton): every image as the reference decodes it
    spec = ViewSpec(original=OriginalSpec(64, aug=NO_AUG))
    ffcv = build("ffcv", spec, source, batch_size=7, workers=2, cache_dir=str(cache))
    tv = build("torchvision", spec, source, batch_size=7, workers=0)
    (a,), (b,) = list(ffcv), list(tv)
    assert a.index.tolist() == b.index.tolist() and k in a.index.tolist()
    assert (a.original - b.original).abs().max().item() * 0.229 * 255 <= 0.01
    ffcv.close()


def test_a_re_encoded_image_larger_than_the_page_is_written_again_with_a_larger_page(tmp_path, capsys):
    """A turned JPEG (EXIF orientation) is re-encoded; at quality 100 its
    record is larger than its own file and than FFCV's default page, which
    the largest file chose: found while writing, written again with 16 MiB."""
    folder = tmp_path / "turned"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    noise = np.random.default_rng(1).integers(0, 256, (2400, 2600, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "turned.jpg", quality=50, exif=exif.tobytes())
    Image.fromarray(noise[:30, :40]).save(folder / "small.jpg", quality=90)
    source = open_source(str(folder), cache_dir=str(tmp_path), progress=False)
    out = tmp_path / "turned.beton"
    assert write_beton(source, out, jpeg_quality=100, workers=2) == {"written": 2, "skipped_index": 0,
                                                                     "skipped_write": 0}
    k = source.paths.index(str(folder / "turned.jpg"))
    buf = io.BytesIO()
    decode(np.fromfile(folder / "turned.jpg", np.uint8)).save(buf, format="JPEG", quality=100)
    assert (folder / "turned.jpg").stat().st_size < FFCV_PAGE < len(buf.getvalue())
    reader = Reader(str(out))
    assert reader.page_size == 1 << 24 and reader.metadata["f1"].tolist() == [0, 1]
    np.testing.assert_array_equal(stored_bytes(out, k), np.frombuffer(buf.getvalue(), np.uint8))
    assert "writing " + str(out) + " again with 16,777,216-byte pages" in capsys.readouterr().err


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    """Small JPEGs in two classes and one, `victim.jpg`, 37 px wide (the only
    width of 37) for a writer worker to fail on."""
    root = make_image_folder(tmp_path_factory.mktemp("victim"), classes=2, per_class=3, size=(24, 24))
    Image.fromarray(np.full((23, 37, 3), 90, np.uint8)).save(root / "class1" / "victim.jpg", quality=90)
    return root


INJECTED = """
import os, signal, sys, time
from pathlib import Path
import pipelines.ffcv as ffcv
from pipelines.base import PipelineError
from pipelines.data import open_source

encode = ffcv._encode_record
def failing(destination, record, malloc):  # runs in the writer's worker processes (forked)
    if record[1] == 37:
        {action}
    encode(destination, record, malloc)
ffcv._encode_record = failing

def children():  # this process's children, but multiprocessing's resource tracker (it ends with us)
    kids = Path(f"/proc/self/task/{{os.getpid()}}/children").read_text().split()
    return [k for k in kids if b"resource_tracker" not in Path(f"/proc/{{k}}/cmdline").read_bytes()]

start = time.monotonic()
if {entry!r} == "command":
    code = ffcv.main(["write", "--data", {data!r}, "--out", {out!r}])
else:
    try:
        ffcv.ensure_beton(open_source({data!r}, progress=False))
        code = 0
    except PipelineError as e:  # train.py prints it as one line, exit 2
        print(f"error: {{e}}", file=sys.stderr)
        code = 2
print("seconds", round(time.monotonic() - start, 1), "children", children())
sys.exit(code)
"""


@pytest.mark.parametrize("entry", ["command", "ensure_beton"])
@pytest.mark.parametrize("failure, reason", [("raise RuntimeError('injected')", "RuntimeError: injected"),
                                             ("os.kill(os.getpid(), signal.SIGKILL)", "SIGKILL")])
def test_a_writer_worker_that_fails_ends_the_write_with_one_line_naming_the_file(victim, tmp_path, entry, failure,
                                                                                reason):
    """An exception in a worker, or its death without a word (the OOM
    killer): FFCV's writer waited for ever for the worker's records. Now the
    write ends at once with one line naming the file, exit 2, and no worker
    process is left."""
    out = tmp_path / "out" / "victim.beton"
    code = INJECTED.format(action=failure, entry=entry, data=str(victim), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "VIEWFORGE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]  # (FFCV's progress bar writes \r)
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, proc.stderr
    assert str(victim / "class1" / "victim.jpg") in lines[-1] and reason in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr
    seconds, children = proc.stdout.split()[1], proc.stdout.split("children", 1)[1].strip()
    assert children == "[]", proc.stdout
    assert float(seconds) < 60, proc.stdout
    if entry == "command":
        assert not out.parent.exists() or os.listdir(out.parent) == []  # no .beton, no temporary file


def test_torch_keeps_its_thread_count(tmp_path):
    """FFCV sets torch's (process-wide) thread count to its own on import,
    when a loader is built and from each epoch's thread; the model must keep
    the count it was given (a fresh process, for the import)."""
    code = f"""
import torch, numba
torch.set_num_threads(3)
numba.set_num_threads(2)
import pipelines.ffcv
assert (torch.get_num_threads(), numba.get_num_threads()) == (3, 2), "import"
from pipelines import build
from pipelines.data import open_source
from pipelines.views import CropSpec, ViewSpec
from tests.conftest import make_image_folder
source = open_source(str(make_image_folder(__import__("pathlib").Path({str(tmp_path)!r}) / "img", classes=1,
                                           per_class=8, size=(20, 16))), cache_dir={str(tmp_path)!r}, progress=False)
loader = build("ffcv", ViewSpec(crops=(CropSpec("global", 2, 8),)), source, batch_size=2, workers=1,
               cache_dir={str(tmp_path)!r})
for epoch in range(2):
    for views in loader:
        assert torch.get_num_threads() == 3, ("epoch", epoch)
print("kept")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "kept" in proc.stdout, proc.stdout + proc.stderr


def test_colour_on_the_device_matches_colour_in_the_stage(tmp_path):
    """The GPU path (FFCV resamples, pipelines/colour.py's CUDA kernels
    colour and paste) against the CPU path, in Numba's CUDA simulator."""
    import numba
    if not numba.config.ENABLE_CUDASIM:
        pytest.skip("runs in Numba's CUDA simulator (a GPU machine has the gpu tests)")
    from pipelines.views import CropSpec, MosaicSpec, MOCOV2_AUG
    from tests.conftest import make_image_folder
    source = open_source(str(make_image_folder(tmp_path / "img", classes=1, per_class=4, size=(20, 16))),
                         cache_dir=str(tmp_path), progress=False)
    spec = ViewSpec(crops=(CropSpec("global", 1, 8, augs=(MOCOV2_AUG,)),),
                    mosaic=MosaicSpec(crops_per_image=4, crop_size=4, jitter=2))
    stage = next(iter(build("ffcv", spec, source, batch_size=4, seed=1, workers=1, cache_dir=str(tmp_path))))
    device = next(iter(build("ffcv", spec, source, batch_size=4, seed=1, workers=1, cache_dir=str(tmp_path),
                             colour_on_device=True)))
    assert torch_equal_within(stage.crops["global"], device.crops["global"])
    assert torch_equal_within(stage.mosaic, device.mosaic)


def torch_equal_within(a, b, levels=1):
    return a.shape == b.shape and float((a - b).abs().max()) <= levels / (0.224 * 255) + 1e-6


def test_a_loader_closed_mid_epoch_stops_rendering(tmp_path, monkeypatch):
    """FFCV's thread looks at its stop event only when the queue is full, and
    closing drains the queue: the epoch thread must still stop within the
    batches already under way, not render the rest of the epoch."""
    from pipelines import ffcv_stage
    rendered = []
    real = ffcv_stage.EpochIterator.run_pipeline
    monkeypatch.setattr(ffcv_stage.EpochIterator, "run_pipeline",
                        lambda self, *a: rendered.append(a[0]) or real(self, *a))
    root = make_image_folder(tmp_path / "folder", classes=2, per_class=40, size=(24, 20))
    source = open_source(str(root), cache_dir=str(tmp_path / "cache"), progress=False)
    loader = build("ffcv", ViewSpec(original=OriginalSpec(16)), source, batch_size=2, seed=0,
                   workers=1, cache_dir=str(tmp_path / "cache"))
    it = iter(loader)
    next(it)
    it.close()
    loader.close()
    steps = len(source) // 2
    assert 0 < len(rendered) < steps // 2, f"rendered {len(rendered)} of {steps} batches after closing at the first"
