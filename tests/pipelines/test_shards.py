"""Tar shards as a source (pipelines/shards.py, shard_writer.py): every
pipeline renders shards written from an ImageFolder exactly as the folder,
skips and replaces bad members as it does bad files, and resumes mid-epoch;
the ways of naming shards, tar header forms, labels, the fd LRU, fork and
pickle, and the converter."""
import io
import multiprocessing
import os
import pickle
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import shards
from pipelines.data import DataError, decodes, open_source, read_checked
from pipelines.shard_writer import write_shards

from .test_contract import build, name  # noqa: F401 (name: the fixture of every pipeline)

B = 4
ROOT = Path(__file__).resolve().parents[2]


def coded_image(c: int, k: int, size) -> Image.Image:
    """Pixels that say where they are: R = 8x, G = 8y (mod 256), B = the image."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(8 * x) % 256, (8 * y) % 256, np.full_like(x, 60 * c + 7 * k)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def coded_folder(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(per_class):
            img = coded_image(c, k, (24 + 4 * k, 20 + 3 * c))
            if k == 1:
                img.save(root / f"class{c}" / f"{k:03d}.png")
            else:
                img.save(root / f"class{c}" / f"{k:03d}.jpg", quality=95)
    return root


def jpeg(size=(16, 12), colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members, fmt=tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(the folder's source, the source of the shards written from it: 3 shards)."""
    tmp = tmp_path_factory.mktemp("shards")
    folder = open_source(str(coded_folder(tmp / "folder")), progress=False)
    written = write_shards(folder, str(tmp / "out" / "train"), per_shard=5, progress=False)
    assert [os.path.basename(p) for p in written] == [f"train-00000{k}.tar" for k in range(3)]
    return folder, open_source(str(tmp / "out" / "train-{000000..000002}.tar"), progress=False)


def assert_same_views(a, b):
    for key in ("crops", "boxes"):
        assert getattr(a, key).keys() == getattr(b, key).keys()
        for family in getattr(a, key):
            assert torch.equal(getattr(a, key)[family], getattr(b, key)[family]), (key, family)
    for key in ("original", "mosaic", "mosaic_rois", "mosaic_src", "mosaic_weight", "pair_boxes", "index",
                "labels", "neighbour"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None and y is None) or torch.equal(x, y), key


def test_the_shards_hold_the_folder_in_its_order(pair):
    folder, tars = pair
    assert len(tars) == len(folder) == 12 and tars.classes == folder.classes
    assert np.array_equal(tars.labels, folder.labels)
    assert np.array_equal(tars.widths, folder.widths) and np.array_equal(tars.heights, folder.heights)
    assert all(np.array_equal(tars.read(i), folder.read(i)) for i in range(len(folder)))
    assert [np.array_equal(x, y) for x, y in zip(tars.read_many([3, 1]), folder.read_many([3, 1]))] == [True] * 2
    assert tars.paths[6].endswith("train-000001.tar:class1/00000006.jpg")
    assert decodes(tars, 1) and decodes(tars, 2)
    assert open_source(tars.name, "test", progress=False) is None


def test_every_pipeline_renders_the_shards_as_the_folder(pair, name):
    folder, tars = pair
    loaders = [build(name, s, batch_size=B) for s in pair]
    for a, b in zip(*[list(loader) for loader in loaders]):
        assert_same_views(a, b)
    for loader in loaders:
        loader.close()


def test_a_mid_epoch_resume_on_shards_gives_the_same_batches(pair, name):
    _, tars = pair
    whole = build(name, tars, batch_size=B)
    reference = [v for _, v in zip(range(3), whole)]
    whole.close()
    first_part = build(name, tars, batch_size=B)
    next(iter(first_part))
    state = first_part.state_dict()
    first_part.close()
    resumed = build(name, tars, batch_size=B)
    resumed.load_state_dict(state)
    got = [v for _, v in zip(range(2), resumed)]
    resumed.close()
    for ref, new in zip(reference[1:], got):
        if name == "synthetic":  # synthetic pixels are fixed noise, not renders
            assert torch.equal(ref.index, new.index) and torch.equal(ref.mosaic_rois, new.mosaic_rois)
        else:
            assert_same_views(ref, new)


@pytest.fixture
def bad_shards(tmp_path, capfd):
    """Three shards, one member garbage from the start, one spoiled in place after indexing."""
    folder = open_source(str(coded_folder(tmp_path / "folder", per_class=5)), progress=False)
    write_shards(folder, str(tmp_path / "s"), per_shard=4, progress=False)
    write_tar(tmp_path / "s-000003.tar", [("class0/garbage.jpg", b"\xff\xd8 not a jpeg"), ("class0/garbage.cls", b"0"),
                                          ("class1/late.jpg", jpeg()), ("class1/late.cls", b"1")])
    source = open_source(str(tmp_path / "s-{000000..000003}.tar"), progress=False)
    assert "skipped 1 unreadable or image-less sample of 12" in capfd.readouterr().err
    spoiled = 7
    m = source.members
    path = m.shards[m.shard[spoiled]]
    st = os.stat(path)
    with open(path, "r+b") as f:  # same size, same mtime: all the index looks at
        os.pwrite(f.fileno(), bytes(int(m.size[spoiled])), int(m.offset[spoiled]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return source, spoiled


def test_bad_members_are_skipped_at_index_and_replaced_after(bad_shards, name):
    source, spoiled = bad_shards
    assert len(source) == 11 and source.skipped == 1
    assert read_checked(source, range(len(source)))[1] == [spoiled]
    # one step: every image (FFCV's writer has left out the spoiled one)
    loader = build(name, source, workers=0, batch_size=len(source) - (name == "ffcv"))
    seen = [i for views in loader for i in views.index.tolist()]
    loader.close()
    if name == "synthetic":
        return
    if name == "ffcv":  # its writer leaves out what fails to decode, counted as skipped
        assert loader.source.skipped == 2 and len(loader.source) == 10
        assert not any(p.endswith("00000007.jpg") for p in loader.source.paths)
    else:
        assert sorted(seen) == list(range(11)) and loader.replaced == [spoiled]


# ---------------------------------------------------------------- naming shards
def test_brace_patterns_expand_in_order_and_zero_padded():
    assert shards.expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert shards.expand_braces("{8..10}") == ["8", "9", "10"]
    assert shards.expand_braces("{1..2}-{x,y}.tar") == ["1-x.tar", "1-y.tar", "2-x.tar", "2-y.tar"]
    with pytest.raises(DataError, match="backwards"):
        shards.expand_braces("{3..1}.tar")


def test_a_missing_shard_is_named(tmp_path, monkeypatch):
    write_tar(tmp_path / "t-0.tar", [("a/1.jpg", jpeg())])
    monkeypatch.chdir(tmp_path)  # relative patterns resolve against the working directory
    assert len(open_source("t-{0..0}.tar", progress=False)) == 1
    with pytest.raises(DataError, match=r"shard .*t-1.tar not found \(the first missing of 3 shards\)"):
        open_source("t-{0..2}.tar", progress=False)


def test_a_list_file_and_a_folder_of_shards(tmp_path):
    (tmp_path / "d").mkdir()
    for k in range(2):
        write_tar(tmp_path / "d" / f"p{k}.tar", [(f"c{k}/{j}.jpg", jpeg()) for j in range(3)])
    (tmp_path / "list.txt").write_text("# two shards\nd/p1.tar\n\nd/p0.tar\n")
    listed = open_source(str(tmp_path / "list.txt"), progress=False)
    assert [p.split("/d/")[1] for p in listed.paths[:4]] == ["p1.tar:c1/0.jpg", "p1.tar:c1/1.jpg", "p1.tar:c1/2.jpg",
                                                              "p0.tar:c0/0.jpg"]
    assert listed.classes == ["c0", "c1"] and listed.labels.tolist() == [1, 1, 1, 0, 0, 0]
    assert len(open_source(str(tmp_path / "d"), progress=False)) == 6
    (tmp_path / "images.txt").write_text("d/x.jpg 0\n")  # an image list is still an image list
    assert shards.shard_paths(str(tmp_path / "images.txt")) is None


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_member_names_in_every_tar_form(tmp_path, fmt):
    long = "d" * 90 + "/" + "k" * 60  # over ustar's 100 bytes: pax 'x', GNU 'L' or ustar's prefix field
    data = [jpeg(colour=(k * 40, 0, 0)) for k in range(3)]
    path = write_tar(tmp_path / "long.tar", [(f"{long}{k}.jpg", d) for k, d in enumerate(data)], fmt)
    found = list(shards.scan_tar(str(path)))
    assert [n for n, _, _ in found] == [f"{long}{k}.jpg" for k in range(3)]
    source = open_source(str(path), progress=False)
    assert [source.read(k).tobytes() for k in range(3)] == data
    assert source.classes == ["d" * 90]


def test_labels_from_cls_members_else_key_prefixes(tmp_path):
    by_prefix = write_tar(tmp_path / "p.tar", [("n02_7.jpg", jpeg()), ("n01_3.jpg", jpeg()), ("x.jpg", jpeg())])
    s = open_source(str(by_prefix), progress=False)
    assert s.classes == ["n01", "n02"] and s.labels.tolist() == [1, 0, -1]
    by_cls = write_tar(tmp_path / "c.tar", [("zebra/1.jpg", jpeg()), ("zebra/1.cls", b"0\n"),
                                            ("ant/2.png.json", b"{}"), ("ant/2.jpg", jpeg()), ("ant/2.cls", b"2"),
                                            ("ant/2.png", b"second image: ignored")])
    s = open_source(str(by_cls), progress=False)
    assert s.labels.tolist() == [0, 2] and s.classes == ["zebra", "1", "ant"] and s.skipped == 0


# ---------------------------------------------------------------- reading
def open_fds(folder: Path) -> int:
    links = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
             if os.path.exists(f"/proc/self/fd/{fd}")]
    return sum(link.startswith(str(folder)) for link in links)


def test_open_shards_stay_within_the_lru_bound_across_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(shards._FILES, "limit", 4)
    for k in range(12):
        write_tar(tmp_path / f"s{k:02d}.tar", [(f"c/{k}.jpg", jpeg(colour=(k * 20, 0, 0)))])
    source = open_source(str(tmp_path / "s{00..11}.tar"), progress=False)
    expected = [jpeg(colour=(k * 20, 0, 0)) for k in range(12)]
    order = np.random.default_rng(0).integers(0, 12, 400).tolist()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: source.read(i).tobytes(), order))
    assert got == [expected[i] for i in order]
    assert 1 <= open_fds(tmp_path) <= 4 and len(shards._FILES.open) <= 4


def _read_in_child(source, i, queue):
    queue.put((len(shards._FILES.open), source.read(i).tobytes()))


def test_reading_after_fork_and_after_pickling(pair):
    _, tars = pair
    tars.read(0)  # the parent holds the shard open
    assert len(shards._FILES.open) >= 1
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(tars, 9, queue))
    child.start()
    held, data = queue.get(timeout=30)
    child.join(30)
    assert held == 0 and data == tars.read(9).tobytes()  # the child opened its own
    again = pickle.loads(pickle.dumps(tars))
    assert np.array_equal(again.read(11), tars.read(11))


def test_the_index_is_cached_and_a_changed_shard_read_again(tmp_path, capfd):
    for k in range(2):
        write_tar(tmp_path / f"s{k}.tar", [(f"c{k}/{j}.jpg", jpeg()) for j in range(2)])
    first = open_source(str(tmp_path / "s{0..1}.tar"), progress=False)
    assert open_source(str(tmp_path / "s{0..1}.tar"), progress=False).fingerprint == first.fingerprint
    assert "re-reading" not in capfd.readouterr().err
    write_tar(tmp_path / "s1.tar", [("c1/0.jpg", jpeg((30, 20)))])
    changed = open_source(str(tmp_path / "s{0..1}.tar"), progress=False)
    assert "re-reading 1 of 2 shards" in capfd.readouterr().err
    assert changed.fingerprint != first.fingerprint and len(changed) == 3
    assert (changed.widths[2], changed.heights[2]) == (30, 20)


def test_the_converter_round_trip(tmp_path):
    folder = coded_folder(tmp_path / "folder", per_class=3)
    proc = subprocess.run([sys.executable, "-m", "pipelines.data", "shards", "--data", str(folder),
                           "--out", str(tmp_path / "sh" / "train"), "--per-shard", "4"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    pattern = f"{tmp_path}/sh/train-{{000000..000001}}.tar"
    assert f"wrote 2 shards of 6 images; train with --data '{pattern}'" in proc.stdout
    assert sorted(os.listdir(tmp_path / "sh")) == ["train-000000.tar", "train-000001.tar"]  # no temporaries
    original = open_source(str(folder), progress=False)
    source = open_source(pattern, progress=False)
    for i in range(len(original)):
        assert source.read(i).tobytes() == Path(original.paths[i]).read_bytes()
    assert source.classes == original.classes and source.labels.tolist() == original.labels.tolist()
    bad = subprocess.run([sys.executable, "-m", "pipelines.data", "shards", "--data", str(folder), "--out",
                          str(tmp_path / "x"), "--per-shard", "0"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and bad.stderr.strip().endswith("error: --per-shard must be positive, not 0")


def test_members_larger_than_the_probe_buffer_are_probed_as_files_are(tmp_path):
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    big = buf.getvalue()
    assert len(big) > 2 * shards._PROBE_BUFFER
    path = write_tar(tmp_path / "big.tar", [("c/0.jpg", big), ("c/1.jpg", big[:len(big) // 2]),
                                            ("c/2.png", b"\x89PNG\r\n\x1a\n" + big[8:])])
    source = open_source(str(path), progress=False)
    assert len(source) == 1 and source.skipped == 2 and (source.widths[0], source.heights[0]) == (200, 150)



def test_the_data_rule_passes_a_pattern_and_the_run_dir_has_no_braces():
    from configs.rules import _data_path
    from model.checkpoints import data_name
    assert _data_path("shards/train-{000000..000009}.tar") and not _data_path("/nonexistent/{1..2}")
    assert data_name("shards/train-{000000..000009}.tar") == "train-000000-000009"


def test_a_list_mixing_shards_and_images_and_an_unreadable_shard_are_one_line_errors(tmp_path):
    (tmp_path / "mixed.txt").write_text("a.tar\nb.jpg 0\n")
    with pytest.raises(DataError, match="every line must; 'b.jpg 0' does not"):
        open_source(str(tmp_path / "mixed.txt"), progress=False)
    (tmp_path / "junk.tar").write_bytes(b"not a tar archive at all" * 40)
    with pytest.raises(DataError, match="junk.tar: not a tar file, or damaged at byte 0"):
        open_source(str(tmp_path / "junk.tar"), progress=False)


def test_a_subset_of_shards_reads_its_own_members(pair):
    from bench.data import random_subset
    _, tars = pair
    sub = random_subset(tars, 5, seed=1)
    keep = [tars.paths.index(p) for p in sub.paths]
    assert all(np.array_equal(sub.read(k), tars.read(i)) for k, i in enumerate(keep))


def test_a_folder_of_train_and_val_shards_gives_both_splits(tmp_path, capfd):
    """The converter's names split a folder: train-* the train split, val-* the test split
    (with the labels the folder's shared class list gave them); no test split otherwise."""
    root = tmp_path / "folder"
    for split, per_class in (("train", 3), ("val", 2)):
        coded_folder(root / split, per_class=per_class)
    out = tmp_path / "shards"
    for split in ("train", "val"):
        write_shards(open_source(str(root), split, progress=False), str(out / split), per_shard=4, progress=False)
    train, test = open_source(str(out), "train", progress=False), open_source(str(out), "test", progress=False)
    folder_train, folder_test = open_source(str(root), "train", progress=False), open_source(str(root), "test",
                                                                                             progress=False)
    assert (train.split, test.split) == ("train", "test") and (len(train), len(test)) == (6, 4)
    assert train.labels.tolist() == folder_train.labels.tolist() and test.labels.tolist() == folder_test.labels.tolist()
    assert all(os.path.basename(p.split(".tar:")[0]).startswith("val-") for p in test.paths)
    assert open_source(f"{out}/train-{{000000..000001}}.tar", "test", progress=False) is None
    write_shards(open_source(str(root), "train", progress=False), str(out / "train"), per_shard=6, progress=False)
    assert "1 shard(s) of an earlier write are still there" in capfd.readouterr().err  # train-000001.tar
