"""Tests of pipelines/index.py and pipelines/jpeg_header.py: the lean JPEG
header reader against PIL, and reopening a folder from its directories' mtimes.

Every test builds its images in tmp_path and points the cache there.
"""
from __future__ import annotations

import io
import os
import stat as stat_mode
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines import data, index
from pipelines.data import open_source
from pipelines.jpeg_header import jpeg_size


# ---------------------------------------------------------------- the JPEG header reader against PIL

def pil_probe(data: bytes) -> tuple:
    """What `probe_bytes` answered before jpeg_header: PIL alone."""
    if not data:
        return (-1, -1)
    try:
        return index.probe_with_pil(io.BytesIO(data), len(data))
    except Exception:
        return (-1, -1)


def tiff_ifd0(entries, big_endian=False, pad=b"") -> bytes:
    """A TIFF header and IFD0 of (tag, type, count, 4 value bytes) entries, then `pad` (out-of-line data)."""
    e = ">" if big_endian else "<"
    head = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "L", 8)
    body = struct.pack(e + "H", len(entries))
    for tag, typ, count, value in entries:
        body += struct.pack(e + "HHL", tag, typ, count) + value
    return head + body + struct.pack(e + "L", 0) + pad


def short(value, big_endian=False) -> bytes:
    return struct.pack(">HH" if big_endian else "<HH", value, 0)


def jpeg(width=40, height=30, mode="RGB", seed=0, exif=None, **save) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    im = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode if mode != "L" else None)
    if exif is not None:
        save["exif"] = exif
    im.convert(mode).save(buf, format="JPEG", **save)
    return buf.getvalue()


def insert_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """`data` with one more segment right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def exif_with_orientation(orientation, big_endian=False, extra=()) -> bytes:
    return b"Exif\x00\x00" + tiff_ifd0([(0x0112, 3, 1, short(orientation, big_endian)), *extra], big_endian)


VARIANTS = {
    "plain": jpeg(),
    "grey": jpeg(mode="L"),
    "cmyk": jpeg(mode="CMYK"),
    "progressive": jpeg(progressive=True),
    "optimised 4:4:4": jpeg(optimize=True, subsampling=0),
    "restart intervals": jpeg(restart_marker_blocks=1),
    "icc profile": jpeg(icc_profile=b"\0" * 300),
    "comment": jpeg(comment=b"hello"),
    "trailing data": jpeg() + b"motion photo video" * 100,
    "truncated": jpeg(80, 60)[:-200],
    "xmp orientation": insert_segment(jpeg(), 0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x tiff:Orientation=\"6\"/>"),
    "exif without orientation, xmp": insert_segment(
        jpeg(exif=b"Exif\x00\x00" + tiff_ifd0([(0x0100, 3, 1, short(7))])), 0xE1,
        b"http://ns.adobe.com/xap/1.0/\x00<x tiff:Orientation=\"8\"/>"),
    "big-endian exif": jpeg(exif=exif_with_orientation(6, big_endian=True)),
    "exif resolution": jpeg(exif=exif_with_orientation(5, extra=[(0x0128, 3, 1, short(3)), (0x011A, 5, 1,
                                                                                              struct.pack("<L", 50))],
                            ) + struct.pack("<LL", 72, 0)),
    "exif orientation as long": jpeg(exif=b"Exif\x00\x00" + tiff_ifd0([(0x0112, 4, 1, struct.pack("<L", 6))])),
    "exif orientation twice": jpeg(exif=b"Exif\x00\x00" + tiff_ifd0([(0x0112, 3, 1, short(6)),
                                                                      (0x0112, 3, 1, short(1))])),
    "exif data out of range": jpeg(exif=b"Exif\x00\x00" + tiff_ifd0([(0x010E, 2, 40, struct.pack("<L", 9999)),
                                                                      (0x0112, 3, 1, short(6))])),
    "two exif segments": insert_segment(jpeg(exif=exif_with_orientation(6)), 0xE1, exif_with_orientation(8)[:-4]),
    "fill bytes": jpeg()[:2] + b"\xff" + jpeg()[2:],
    "short jfif": insert_segment(jpeg()[:2] + jpeg()[20:], 0xE0, b"JFIF\x00"),
    "12-bit sof": jpeg().replace(b"\xff\xc0\x00\x11\x08", b"\xff\xc0\x00\x11\x0c", 1),
    "zero height": jpeg().replace(b"\xff\xc0\x00\x11\x08\x00\x1e", b"\xff\xc0\x00\x11\x08\x00\x00", 1),
    "empty": b"",
    "png": (lambda b: (Image.new("RGB", (5, 4)).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO()),
}
for _o in range(1, 9):
    VARIANTS[f"exif orientation {_o}"] = jpeg(48, 20, exif=exif_with_orientation(_o))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_header_reader_answers_as_pil(name):
    data = VARIANTS[name]
    assert index.probe_bytes(data) == pil_probe(data)


def test_the_header_reader_answers_regular_files_itself():
    for name in ("plain", "grey", "cmyk", "progressive", "icc profile", "big-endian exif", "exif resolution",
                 *(f"exif orientation {o}" for o in range(1, 9))):
        assert jpeg_size(VARIANTS[name], lambda n: b"") is not None, name
    assert jpeg_size(VARIANTS["exif orientation 6"], lambda n: b"")[2] == 6
    assert index.probe_bytes(VARIANTS["exif orientation 6"]) == (20, 48)  # stored 48 x 20, shown portrait
    for name in ("xmp orientation", "two exif segments", "fill bytes", "exif orientation as long"):
        assert jpeg_size(VARIANTS[name], lambda n: b"") is None, name  # left to PIL


def test_headers_longer_than_the_first_read(tmp_path):
    data = insert_segment(jpeg(exif=exif_with_orientation(6)), 0xE3, b"x" * 40000)
    path = tmp_path / "long.jpg"
    path.write_bytes(data)
    assert index.probe_image(str(path)) == (30, 40) == pil_probe(data)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(name=st.sampled_from(sorted(VARIANTS)), cut=st.integers(0, 4000), flips=st.lists(
    st.tuples(st.integers(0, 700), st.integers(0, 255)), max_size=3))
def test_damaged_headers_answer_as_pil(name, cut, flips):
    data = bytearray(VARIANTS[name])
    for at, value in flips:
        if at < len(data):
            data[at] = value
    data = bytes(data[:len(data) - cut] if cut < len(data) else data)
    assert index.probe_bytes(data) == pil_probe(data)


# ---------------------------------------------------------------- reopening a folder

def write_jpeg(path, width=40, height=30, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(jpeg(width, height, seed=seed))
    return str(path)


OLD = 1_700_000_000 * 10**9  # November 2023


def age(root):
    """Set every directory's mtime to OLD, as a data set's are: no longer 'too recent to trust'."""
    old = OLD
    for directory, _, _ in os.walk(root):
        os.utime(directory, ns=(old, old))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for c in range(3):
        for i in range(4):
            write_jpeg(root / f"class{c}" / f"{i}.jpg", 20 + i, 10 + c, seed=c * 10 + i)
    write_jpeg(root / "class2" / "deeper" / "x.jpg", 33, 11)
    age(root)
    return root


def open_quiet(root, tmp_path, **kw):
    return open_source(str(root), "train", cache_dir=str(tmp_path / "cache"), progress=False, **kw)


@pytest.fixture
def counted_stats(monkeypatch):
    """Images that os.stat and probe_image look at, and 'walk' for each walk (which stats every file)."""
    seen = []
    real_stat, real_probe = os.stat, index.probe_image

    def stat(path, *a, **kw):
        result = real_stat(path, *a, **kw)
        if not stat_mode.S_ISDIR(result.st_mode) and str(path).endswith(".jpg"):
            seen.append(str(path))
        return result

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(index, "probe_image", lambda p, s=None: (seen.append(p), real_probe(p, s))[1])
    monkeypatch.setattr(data, "walk_folder", lambda *a: (seen.append("walk"), index.walk_folder(*a))[1])
    return seen


def test_reopening_an_unchanged_folder_neither_walks_nor_stats_files(folder, tmp_path, counted_stats):
    first = open_quiet(folder, tmp_path)
    assert "walk" in counted_stats and len(first) == 13
    counted_stats.clear()
    again = open_quiet(folder, tmp_path)
    assert counted_stats == []
    assert again.paths == first.paths and again.fingerprint == first.fingerprint
    assert again.labels.tolist() == first.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 5
    assert again.widths.tolist() == first.widths.tolist() and again.classes == ["class0", "class1", "class2"]


def test_a_file_rewritten_in_place_is_noticed_only_with_recheck(folder, tmp_path, counted_stats):
    first = open_quiet(folder, tmp_path)
    target = str(folder / "class1" / "2.jpg")
    write_jpeg(target, 22, 11, seed=99)  # the same name, other bytes, a new mtime; the folder is unchanged
    counted_stats.clear()
    same = open_quiet(folder, tmp_path)
    assert counted_stats == [] and same.fingerprint == first.fingerprint
    rechecked = open_quiet(folder, tmp_path, recheck=True)
    assert target in counted_stats and rechecked.fingerprint != first.fingerprint
    counted_stats.clear()
    assert open_quiet(folder, tmp_path).fingerprint == rechecked.fingerprint and counted_stats == []


@pytest.mark.parametrize("change", ["add a file", "remove a file", "add a class", "rename a file",
                                    "add a file deeper", "replace by rename"])
def test_entries_added_removed_or_renamed_are_noticed_without_recheck(folder, tmp_path, change, capfd):
    first = open_quiet(folder, tmp_path)
    if change == "add a file":
        write_jpeg(folder / "class0" / "9.jpg", 50, 10)
    elif change == "remove a file":
        os.remove(folder / "class1" / "0.jpg")
    elif change == "add a class":
        write_jpeg(folder / "class3" / "0.jpg", 50, 10)
    elif change == "rename a file":
        os.rename(folder / "class0" / "1.jpg", folder / "class0" / "8.jpg")
    elif change == "add a file deeper":
        write_jpeg(folder / "class2" / "deeper" / "y.jpg", 50, 10)
    else:  # a new version written beside the old and renamed over it, as careful writers do
        write_jpeg(folder / "class0" / "tmp.jpg", 50, 10)
        os.replace(folder / "class0" / "tmp.jpg", folder / "class0" / "0.jpg")
    capfd.readouterr()
    again = open_quiet(folder, tmp_path)
    assert again.fingerprint != first.fingerprint
    assert "since it was built" in capfd.readouterr().err
    fresh = open_source(str(folder), "train", cache_dir=str(tmp_path / "fresh"), progress=False)
    assert again.paths == fresh.paths and again.labels.tolist() == fresh.labels.tolist()
    assert again.widths.tolist() == fresh.widths.tolist() and again.classes == fresh.classes
    assert again.fingerprint == fresh.fingerprint


def test_a_directory_changed_moments_before_the_walk_is_walked_again(tmp_path, counted_stats):
    root = tmp_path / "new"
    write_jpeg(root / "a" / "0.jpg")  # just written: its directory's mtime is too recent to trust
    open_quiet(root, tmp_path)
    counted_stats.clear()
    open_quiet(root, tmp_path)
    assert "walk" in counted_stats
    age(root)
    open_quiet(root, tmp_path)
    counted_stats.clear()
    open_quiet(root, tmp_path)
    assert counted_stats == []


def test_an_index_of_an_older_version_is_rebuilt(folder, tmp_path, counted_stats):
    open_quiet(folder, tmp_path)
    (cache_file,) = (tmp_path / "cache" / "index").glob("*.npz")
    with np.load(cache_file) as z:
        arrays = dict(z)
    arrays["version"] = np.int64(index.INDEX_VERSION - 1)
    np.savez(cache_file, **arrays)
    assert index.load_index(cache_file) is None
    counted_stats.clear()
    assert len(open_quiet(folder, tmp_path)) == 13
    assert sum(p.endswith(".jpg") for p in counted_stats) >= 13  # every header read again
    assert index.load_index(cache_file) is not None
