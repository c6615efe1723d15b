"""Tests of pipelines/data.py and pipelines/index.py: sources, the cached index, corrupt files, the embedded sample.

Every test builds its images in tmp_path and points the cache there
(cache_dir=...), so the user's ~/.cache is never touched.
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from pipelines import data as D
from pipelines import index
from pipelines.data import DataError, Source, open_source


# ---------------------------------------------------------------- helpers

def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def write_image(path, width=40, height=30, mode="RGB", orientation=None, fmt=None, seed=0, **save_args):
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if orientation is not None:
        exif = Image.Exif()
        exif[index.EXIF_ORIENTATION] = orientation
        save_args["exif"] = exif.tobytes()
    noise_image(width, height, mode, seed).save(path, format=fmt, **save_args)
    return path


def decoded_size(path) -> tuple:
    """What a decoder that honours EXIF (DALI, torchvision's decode) gives, as (width, height)."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).size


def open_quiet(data, split="train", cache=None, tmp_path=None):
    return open_source(str(data) if data is not None else None, split,
                       cache_dir=str(cache or tmp_path / "cache"), progress=False)


# ---------------------------------------------------------------- ImageFolder

def test_image_folder_round_trip(tmp_path):
    root = tmp_path / "pets"
    write_image(root / "cat" / "a.jpg", 40, 30)
    write_image(root / "cat" / "b.JPEG", 40, 30, orientation=6)  # stored landscape, shown portrait
    write_image(root / "dog" / "c.png", 20, 10)
    write_image(root / "dog" / "nested" / "d.jpg", 16, 12, mode="L")
    (root / "dog" / "notes.txt").write_text("not an image")
    write_image(root / ".hidden" / "e.jpg")  # hidden folders are not classes

    src = open_quiet(root, tmp_path=tmp_path)
    assert isinstance(src, Source) and src.name == str(root) and src.split == "train"
    assert src.classes == ["cat", "dog"]
    assert [os.path.relpath(p, root) for p in src.paths] == ["cat/a.jpg", "cat/b.JPEG", "dog/c.png", "dog/nested/d.jpg"]
    assert all(os.path.isabs(p) for p in src.paths)
    assert src.labels.dtype == np.int64 and src.labels.tolist() == [0, 0, 1, 1]
    assert src.widths.dtype == np.int32 and src.heights.dtype == np.int32
    assert list(zip(src.widths.tolist(), src.heights.tolist())) == [(40, 30), (30, 40), (20, 10), (16, 12)]
    assert [decoded_size(p) for p in src.paths] == list(zip(src.widths.tolist(), src.heights.tolist()))
    assert src.has_labels and src.skipped == 0 and len(src) == 4

    raw = src.read(1)
    assert raw.dtype == np.uint8 and raw.ndim == 1
    assert raw.tobytes() == (root / "cat" / "b.JPEG").read_bytes()
    assert [r.tobytes() for r in src.read_many([3, 0])] == [src.read(3).tobytes(), src.read(0).tobytes()]
    assert open_quiet(root, "test", tmp_path=tmp_path) is None  # no val/ or test/: no labelled split


@pytest.mark.parametrize("ext,fmt", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("tif", "TIFF")])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_probe_size_matches_exif_aware_decode(tmp_path, ext, fmt, orientation):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = write_image(tmp_path / f"x.{ext}", 50, 20, orientation=orientation, fmt=fmt)
    assert index.probe_image(path) == decoded_size(path)


def test_unlabelled_flat_folder(tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        write_image(root / f"{i}.jpg", 30 + i, 20)
    src = open_quiet(root, tmp_path=tmp_path)
    assert len(src) == 3 and src.classes == [] and src.labels.tolist() == [-1, -1, -1]
    assert not src.has_labels
    assert src.widths.tolist() == [30, 31, 32]


def test_train_val_split_detection_shares_classes(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "train" / "ant" / "1.jpg")
    write_image(root / "train" / "bee" / "2.jpg")
    write_image(root / "val" / "bee" / "3.jpg")
    write_image(root / "val" / "cow" / "4.jpg")  # a class seen only in val still gets one stable number
    train = open_quiet(root, "train", tmp_path=tmp_path)
    test = open_quiet(root, "test", tmp_path=tmp_path)
    assert train.classes == test.classes == ["ant", "bee", "cow"]
    assert train.labels.tolist() == [0, 1] and test.labels.tolist() == [1, 2]
    assert all("/train/" in p for p in train.paths) and all("/val/" in p for p in test.paths)
    assert test.split == "test" and open_quiet(root, "val", tmp_path=tmp_path).paths == test.paths


def test_lone_train_folder_is_the_split_not_a_class(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "train" / "a" / "1.jpg")
    write_image(root / "train" / "b" / "2.jpg")
    src = open_quiet(root, tmp_path=tmp_path)
    assert src.classes == ["a", "b"] and src.labels.tolist() == [0, 1]
    assert open_quiet(root, "test", tmp_path=tmp_path) is None


def test_test_folder_is_used_when_there_is_no_val(tmp_path):
    root = tmp_path / "ds"
    write_image(root / "train" / "a" / "1.jpg")
    write_image(root / "test" / "a" / "2.jpg")
    assert [os.path.basename(p) for p in open_quiet(root, "test", tmp_path=tmp_path).paths] == ["2.jpg"]


# ---------------------------------------------------------------- corrupt files

def test_corrupt_files_are_skipped_and_counted(tmp_path, capsys):
    root = tmp_path / "mixed"
    good = [
        write_image(root / "good.jpg"),
        write_image(root / "gray.jpg", mode="L"),
        write_image(root / "cmyk.jpg", mode="CMYK"),
        write_image(root / "picture.png"),
        write_image(root / "picture.bmp"),
    ]
    whole = (root / "good.jpg").read_bytes()
    (root / "trailer.jpg").write_bytes(whole + b"\0" * 5000)  # bytes after EOI: decoders stop at EOI
    good.append(str(root / "trailer.jpg"))
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "no_eoi.jpg").write_bytes(whole[:-2])  # only the end marker missing: DALI still fails
    (root / "empty.jpg").write_bytes(b"")
    (root / "garbage.jpg").write_bytes(os.urandom(2000))
    png = (root / "picture.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "text.png").write_bytes(b"hello, not a png")

    src = open_quiet(root, tmp_path=tmp_path)
    assert sorted(src.paths) == sorted(os.path.abspath(p) for p in good)
    assert src.skipped == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"warning: skipped 6 unreadable files of 12 in {root} (e.g. {root}/")

    # The verdicts are cached too: reopening warns again without reading anything.
    src_again = open_quiet(root, tmp_path=tmp_path)
    assert src_again.skipped == 6 and src_again.paths == src.paths


def test_only_corrupt_files_is_an_error(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "b.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 2 image files could be read"):
        open_quiet(root, tmp_path=tmp_path)


def test_large_folder_uses_the_thread_pool_in_order(tmp_path):
    root = tmp_path / "many"
    for i in range(3 * index._PROBE_CHUNK + 5):
        write_image(root / f"{i:04d}.png", 8 + i % 7, 5, fmt="PNG")
    (root / "0100.png").write_bytes(b"")
    src = open_quiet(root, tmp_path=tmp_path)
    assert len(src) == 3 * index._PROBE_CHUNK + 4 and src.skipped == 1
    expected = [8 + i % 7 for i in range(3 * index._PROBE_CHUNK + 5) if i != 100]
    assert src.widths.tolist() == expected


# ---------------------------------------------------------------- file lists

def test_file_list_with_labels_and_relative_paths(tmp_path):
    images = tmp_path / "imgs"
    write_image(images / "a.jpg", 11, 10)
    write_image(images / "sub dir" / "b.png", 12, 10)
    outside = write_image(tmp_path / "elsewhere" / "c.jpg", 13, 10)
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(
        "# path label\n"
        "\n"
        "../imgs/a.jpg 3\n"
        "../imgs/sub dir/b.png   0\n"
        f"{outside} 1\n"
        "../imgs/missing.jpg 2\n")
    src = open_quiet(listing, tmp_path=tmp_path)
    assert src.name == str(listing)
    assert src.paths == [str(images / "a.jpg"), str(images / "sub dir" / "b.png"), outside]
    assert src.labels.tolist() == [3, 0, 1]
    assert src.widths.tolist() == [11, 12, 13]
    assert src.classes == ["0", "1", "2", "3"] and src.has_labels
    assert src.skipped == 1  # the missing file
    assert open_quiet(listing, "test", tmp_path=tmp_path) is None


def test_file_list_without_labels(tmp_path):
    write_image(tmp_path / "x.jpg")
    write_image(tmp_path / "y.jpg")
    listing = tmp_path / "all.txt"
    listing.write_text("x.jpg\ny.jpg\n")
    src = open_quiet(listing, tmp_path=tmp_path)
    assert len(src) == 2 and src.labels.tolist() == [-1, -1]
    assert src.classes == [] and not src.has_labels


def test_file_list_rejects_bad_labels_and_empty_lists(tmp_path):
    write_image(tmp_path / "x.jpg")
    bad = tmp_path / "bad.txt"
    bad.write_text("x.jpg -5\n")
    with pytest.raises(DataError, match=r"bad.txt:1: label -5"):
        open_quiet(bad, tmp_path=tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(DataError, match="names no images"):
        open_quiet(empty, tmp_path=tmp_path)


# ---------------------------------------------------------------- the index cache

@pytest.fixture
def probe_counter(monkeypatch):
    calls = []
    real_probe = index.probe_image

    def counting_probe(path, size=None):
        calls.append(path)
        return real_probe(path, size)

    monkeypatch.setattr(index, "probe_image", counting_probe)
    return calls


def test_index_cache_is_reused_and_updated(tmp_path, probe_counter):
    root = tmp_path / "cached"
    for i in range(5):
        write_image(root / "c" / f"{i}.jpg", 20 + i, 10)
    cache = tmp_path / "cache"

    first = open_quiet(root, cache=cache)
    assert len(probe_counter) == 5
    index_files = list((cache / "index").glob("*.npz"))
    assert len(index_files) == 1

    probe_counter.clear()
    second = open_quiet(root, cache=cache)
    assert probe_counter == []  # nothing re-read
    assert second.paths == first.paths and second.widths.tolist() == first.widths.tolist()

    new_file = write_image(root / "c" / "9.jpg", 99, 10)
    probe_counter.clear()
    third = open_quiet(root, cache=cache)
    assert probe_counter == [new_file]  # only the new file
    assert len(third) == 6 and third.widths.tolist()[-1] == 99

    changed = write_image(root / "c" / "0.jpg", 77, 10)
    os.utime(changed, ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    probe_counter.clear()
    fourth = open_quiet(root, cache=cache)
    assert probe_counter == [changed] and fourth.widths.tolist()[0] == 77

    os.remove(root / "c" / "1.jpg")
    probe_counter.clear()
    fifth = open_quiet(root, cache=cache)
    assert probe_counter == [] and len(fifth) == 5


def test_damaged_cache_is_rebuilt(tmp_path, probe_counter):
    root = tmp_path / "d"
    write_image(root / "a.jpg")
    cache = tmp_path / "cache"
    open_quiet(root, cache=cache)
    for f in (cache / "index").glob("*.npz"):
        f.write_bytes(b"not a zip")
    probe_counter.clear()
    assert len(open_quiet(root, cache=cache)) == 1 and len(probe_counter) == 1


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("VIEWFORGE_CACHE", str(tmp_path / "env"))
    assert D.cache_root() == tmp_path / "env"
    assert D.cache_root(str(tmp_path / "given")) == tmp_path / "given"
    monkeypatch.delenv("VIEWFORGE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert D.cache_root() == tmp_path / "home" / ".cache" / "viewforge"


# ---------------------------------------------------------------- errors

def test_missing_path_and_empty_folder_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such file or directory"):
        open_quiet(tmp_path / "nowhere", tmp_path=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images found"):
        open_quiet(tmp_path / "empty", tmp_path=tmp_path)
    (tmp_path / "classes" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        open_quiet(tmp_path / "classes", tmp_path=tmp_path)
    (tmp_path / "weights.pth").write_bytes(b"x")
    with pytest.raises(DataError, match="expected a directory of images or a .txt file list"):
        open_quiet(tmp_path / "weights.pth", tmp_path=tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        open_source(str(tmp_path), "validation", cache_dir=str(tmp_path))
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------- Fashion-MNIST and the sample

def write_idx(path, array: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_missing_package_message(tmp_path, monkeypatch):
    absent = tmp_path / "no-such-dir"
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", str(absent))
    with pytest.raises(DataError) as err:
        open_source("fashion-mnist", cache_dir=str(tmp_path), progress=False)
    assert str(err.value) == (f"Fashion-MNIST not found under {absent}: install it with "
                              "`apt-get install dataset-fashion-mnist`")


def test_fashion_mnist_from_idx_files(tmp_path, monkeypatch):
    """The full-set path on a tiny fake of the Debian files (same names and format)."""
    src_dir = tmp_path / "fmnist"
    src_dir.mkdir()
    rng = np.random.default_rng(1)
    expected = {}
    for split, (images_name, labels_name) in D.FASHION_MNIST_FILES.items():
        n = 30 if split == "train" else 10
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(src_dir / images_name, images)
        write_idx(src_dir / labels_name, labels)
        expected[split] = (images, labels)
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", str(src_dir))
    cache = tmp_path / "cache"
    for split, (images, labels) in expected.items():
        src = open_source("fashion-mnist", split, cache_dir=str(cache), progress=False)
        assert src.name == "fashion-mnist" and len(src) == len(labels)
        assert src.classes == D.FASHION_MNIST_CLASSES
        assert sorted(src.labels.tolist()) == sorted(labels.tolist())
        assert (src.widths == 28).all() and (src.heights == 28).all()
        # File k holds image k with its own label, JPEG-encoded at high quality.
        for path, label in zip(src.paths, src.labels):
            k = int(os.path.splitext(os.path.basename(path))[0])
            assert label == labels[k] and os.path.basename(os.path.dirname(path)) == D.FASHION_MNIST_CLASSES[label]
            decoded = np.asarray(Image.open(path), dtype=np.int16)
            assert np.abs(decoded - images[k]).mean() < 8
    assert (cache / "fashion-mnist" / "train").is_dir() and not list(cache.glob(".fashion-mnist.*"))
    # Once written, the tree serves even if the package goes away.
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", str(tmp_path / "gone"))
    assert len(open_source("fashion-mnist", cache_dir=str(cache), progress=False)) == 30


def test_real_fashion_mnist_idx_headers_when_installed():
    labels_file = os.path.join(D.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")
    if not os.path.isfile(labels_file):
        pytest.skip("dataset-fashion-mnist not installed")
    labels = D.read_idx(labels_file)
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10


def test_killed_materialisation_leaves_nothing(tmp_path):
    dest = tmp_path / "tree"
    images = np.zeros((4, 28, 28), np.uint8)
    bad_labels = np.array([0, 1, 2, 99])  # fails on the last image, half-way through writing

    with pytest.raises(IndexError):
        D._materialise(dest, "tag", lambda: {"train": (images, bad_labels)}, ["a", "b", "c"], False, "")
    assert list(tmp_path.iterdir()) == []  # neither the tree nor its temporary


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sample-cache")


def test_embedded_sample(sample_cache):
    train = open_source(None, "train", cache_dir=str(sample_cache), progress=False)
    test = open_source(None, "test", cache_dir=str(sample_cache), progress=False)
    assert (train.name, len(train), len(test)) == ("sample", 5000, 1000)
    assert train.classes == test.classes == D.FASHION_MNIST_CLASSES and len(train.classes) == 10
    assert np.bincount(train.labels).tolist() == [500] * 10 and np.bincount(test.labels).tolist() == [100] * 10
    assert (train.widths == 28).all() and (train.heights == 28).all() and train.skipped == 0
    assert train.read(0)[:2].tobytes() == b"\xff\xd8"  # a real JPEG for the real decode path
    assert all(p.startswith(str(sample_cache / "sample" / "train")) for p in train.paths[:10])


def test_embedded_sample_is_written_once(sample_cache, monkeypatch):
    open_source("sample", cache_dir=str(sample_cache), progress=False)
    monkeypatch.setattr(Image, "fromarray", lambda *a, **k: pytest.fail("sample written again"))
    assert len(open_source("sample", "test", cache_dir=str(sample_cache), progress=False)) == 1000


def test_sample_file_matches_its_readme():
    with np.load(D.SAMPLE_FILE) as z:
        assert z["train_images"].shape == (5000, 28, 28) and z["train_images"].dtype == np.uint8
        assert z["test_images"].shape == (1000, 28, 28)
        assert z["train_labels"].dtype == np.int64
        assert z["classes"].tolist() == D.FASHION_MNIST_CLASSES
    assert D.SAMPLE_FILE.stat().st_size < 5_000_000
    assert "MIT" in (D.SAMPLE_FILE.parent / "README.md").read_text()
