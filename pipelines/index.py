"""The image index's parts that need no Source: the folder walk, probing files, the cache file.

`walk_folder` lists a folder's image files with their sizes and mtimes
(one scandir per directory, one stat per file) and records every directory
it visited with its mtime; `folder_unchanged` tells from those directories
alone (one stat each, no walk) that no entry was added, removed or renamed
since. `probe_image` / `probe_bytes` find each file's size as decoded
(after EXIF orientation, as DALI decodes) or that it would stop a pipeline
(empty, not an image, truncated JPEG, corrupt PNG): regular JPEGs through
pipelines/jpeg_header.py, the rest through PIL. `load_index` / `save_index`
keep the results under `cache_root()/index/`. pipelines/data.py's
`index_source` uses all three.
"""
from __future__ import annotations

import io
import os
import pathlib
import sys
import tempfile
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from operator import attrgetter
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from .jpeg_header import jpeg_size

# 2: the walk's directories and their mtimes, each file's group (class folder)
INDEX_VERSION = 2
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # 90-degree turns: width and height swap
_JPEG_EOI = b"\xff\xd9"
# Inside entropy-coded data 0xFF is always followed by 0x00 or a restart
# marker, so FF D9 near the end can only be the real end-of-image marker.
_JPEG_TAIL_BYTES = 1024
_PROBE_CHUNK = 128
_PROBE_THREADS = 8  # header reads wait on I/O; more threads than cores pays off
_HEAD_BYTES = 8192  # most JPEG headers end well inside; jpeg_header reads on where one does not
_UNUSABLE = (-1, -1)
# A directory modified this close before the walk began may change again
# within its filesystem's timestamp granularity (1 s on some, 2 s on FAT)
# without its mtime moving: it is recorded as unknown, so the next open walks.
_RACY_NS = 2_000_000_000
_CACHE_KEYS = ("paths", "sizes", "mtimes", "widths", "heights", "groups", "group_names", "dirs", "dir_mtimes")


# ---------------------------------------------------------------- the cache file
def join_paths(paths: list) -> bytes:
    return "\0".join(paths).encode("utf-8", "surrogateescape")


def split_paths(blob) -> list:
    """The paths of a `join_paths` blob (bytes or a uint8 array: read in place)."""
    return str(memoryview(blob), "utf-8", "surrogateescape").split("\0") if len(blob) else []


def load_index(cache_file: pathlib.Path) -> Optional[dict]:
    """The arrays of `save_index`, or None for a cache that is absent, damaged or of another version."""
    try:
        with np.load(cache_file) as z:
            if int(z["version"]) != INDEX_VERSION:
                return None
            return {k: z[k] for k in _CACHE_KEYS}
    except (OSError, KeyError, ValueError, EOFError):
        return None  # rebuild


def save_index(cache_file: pathlib.Path, arrays: dict) -> None:
    """Write atomically; a cache that cannot be written only costs time on the next open.

    `arrays`: paths, group_names and dirs as `join_paths` blobs, the rest
    per file (sizes, mtimes, widths, heights, groups) or per directory (dir_mtimes)."""
    write_cache(cache_file, "image index", version=np.int64(INDEX_VERSION), compressed=True,
                **{k: arrays[k] for k in _CACHE_KEYS})


def write_cache(cache_file: pathlib.Path, what: str, compressed: bool = False, **arrays) -> None:
    """An .npz of `arrays` (bytes become uint8 arrays) written to a temporary
    file and renamed into place, so readers see the old file or the new one;
    a cache that cannot be written is one warning, not an error."""
    as_array = {k: np.frombuffer(v, dtype=np.uint8) if isinstance(v, bytes) else np.asarray(v)
                for k, v in arrays.items()}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=cache_file.stem + ".", suffix=".tmp", dir=cache_file.parent)
        with os.fdopen(fd, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **as_array)
        os.replace(tmp, cache_file)
    except OSError as e:
        print(f"warning: could not write the {what} cache {cache_file}: {e}", file=sys.stderr)


# ---------------------------------------------------------------- the folder walk
def walk_folder(root: str, groups: list) -> dict:
    """Image files under root/<group> for each group in turn ('.': root
    itself), each depth first in name order (symlinks followed once per
    group), hidden entries left out. Returns paths, sizes and mtimes (-1 and
    0 where a stat fails), each file's group number, and every directory
    visited with its mtime, taken before it was read (-1 where too recent to
    trust, see _RACY_NS)."""
    out = {"paths": [], "sizes": array("q"), "mtimes": array("q"), "groups": array("i"), "dirs": [],
           "dir_mtimes": array("q")}
    trusted_before = time.time_ns() - _RACY_NS
    root = os.path.abspath(root)
    for number, group in enumerate(groups):
        _walk(os.path.normpath(os.path.join(root, group)), number, set(), out)
    out["dir_mtimes"] = np.frombuffer(out["dir_mtimes"], dtype=np.int64).copy()
    out["dir_mtimes"][out["dir_mtimes"] >= trusted_before] = -1
    for k in ("sizes", "mtimes"):
        out[k] = np.frombuffer(out[k], dtype=np.int64)
    out["groups"] = np.frombuffer(out["groups"], dtype=np.int32)
    return out


def _walk(directory: str, group: int, seen: set, out: dict) -> None:
    real = os.path.realpath(directory)
    if real in seen:
        return
    seen.add(real)
    out["dirs"].append(directory)
    out["dir_mtimes"].append(os.stat(directory).st_mtime_ns)
    with os.scandir(directory) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=attrgetter("name"))
    paths, sizes, mtimes = out["paths"], out["sizes"], out["mtimes"]
    for entry in entries:
        name = entry.name
        if entry.is_dir():
            _walk(entry.path, group, seen, out)
        elif name[name.rfind("."):].lower() in IMAGE_EXTENSIONS and entry.is_file():
            try:
                st = entry.stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:  # gone since the scandir
                size, mtime = -1, 0
            paths.append(entry.path)
            sizes.append(size)
            mtimes.append(mtime)
            out["groups"].append(group)


def stat_listed(paths: list) -> dict:
    """What `walk_folder` records, for a file list: one stat per path (size -1 where missing), no directories."""
    sizes = np.full(len(paths), -1, dtype=np.int64)
    mtimes = np.zeros(len(paths), dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return {"sizes": sizes, "mtimes": mtimes, "groups": np.zeros(0, np.int32), "group_names": b"", "dirs": b"",
            "dir_mtimes": np.zeros(0, np.int64)}


def folder_unchanged(cached: dict) -> bool:
    """Whether every directory the cached walk visited still has its recorded
    mtime: then no entry was added, removed or renamed in any of them."""
    dirs = split_paths(cached["dirs"])
    if not dirs:
        return False  # a file list's index, or an empty record
    for directory, mtime in zip(dirs, cached["dir_mtimes"].tolist()):
        try:
            if mtime < 0 or os.stat(directory).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True



# ---------------------------------------------------------------- probing
def probe_all(paths: list, sizes: np.ndarray, progress: bool, shown: str) -> tuple:
    """(widths, heights) int32 of `probe_image` over many files (`probe_many`)."""
    return probe_many(len(paths), lambda i: probe_image(paths[i], int(sizes[i])), progress, shown)


def probe_many(count: int, probe_one, progress: bool, shown: str) -> tuple:
    """(widths, heights) int32 of `probe_one(i)` for i < count, on a thread
    pool (header reads wait on I/O), with a progress bar."""
    widths, heights = np.empty(count, np.int32), np.empty(count, np.int32)

    def chunk(start: int) -> int:
        for i in range(start, min(start + _PROBE_CHUNK, count)):
            widths[i], heights[i] = probe_one(i)
        return min(_PROBE_CHUNK, count - start)

    if count <= _PROBE_CHUNK:
        chunk(0)
        return widths, heights
    with tqdm(total=count, desc=f"indexing {shown}", unit="img", disable=not progress, leave=False,
              file=sys.stderr) as bar, ThreadPoolExecutor(_PROBE_THREADS) as pool:
        for done in pool.map(chunk, range(0, count, _PROBE_CHUNK)):
            bar.update(done)
    return widths, heights


def probe_image(path: str, size: Optional[int] = None) -> tuple:
    """(width, height) as decoded after EXIF orientation, or (-1, -1) for a file that would fail.

    JPEGs cost a header read and a look at their last bytes; a full decode
    happens only when the end-of-image marker is not there (a truncated file,
    or data after the image such as a motion photo's video). PNGs are
    checked chunk by chunk (`verify`, no decode); other formats are decoded.
    """
    try:
        if size is None:
            size = os.path.getsize(path)
        with open(path, "rb") as f:
            return probe_file(f, size)
    except Exception:  # PIL raises many kinds (OSError, SyntaxError, ValueError, struct.error...)
        return _UNUSABLE


def probe_bytes(data) -> tuple:
    """`probe_image` of an encoded file already in memory (bytes or a uint8 array)."""
    try:
        return probe_file(io.BytesIO(memoryview(data).cast("B")), len(data))
    except Exception:
        return _UNUSABLE


def probe_file(f, size: int) -> tuple:
    """`probe_image` of an open file of `size` bytes (a file, or a tar member in
    pipelines/shards.py), except that it raises where the file would fail."""
    if size == 0:
        return _UNUSABLE
    regular = jpeg_size(f.read(_HEAD_BYTES), f.read)
    if regular is not None:
        f.seek(max(0, size - _JPEG_TAIL_BYTES))
        if _JPEG_EOI in f.read():
            width, height, orientation = regular
            return (height, width) if orientation in TRANSPOSED_ORIENTATIONS else (width, height)
    f.seek(0)
    return probe_with_pil(f, size)


def probe_with_pil(f, size: int) -> tuple:
    """`probe_file` of anything jpeg_header does not vouch for; raises where the file would fail."""
    with Image.open(f) as im:
        fmt = im.format
        if fmt in ("JPEG", "MPO"):
            width, height = im.size
            orientation = im.getexif().get(EXIF_ORIENTATION)
        elif fmt == "PNG":
            width, height = im.size
            im.verify()
            orientation = _orientation_from_exif_bytes(im.info.get("exif"))
        else:
            # Decoding also settles orientation: PIL turns TIFFs itself and drops the tag.
            im.load()
            width, height = im.size
            orientation = im.getexif().get(EXIF_ORIENTATION)
    if fmt in ("JPEG", "MPO"):
        f.seek(max(0, size - _JPEG_TAIL_BYTES))
        if _JPEG_EOI not in f.read():
            f.seek(0)
            with Image.open(f) as full:
                full.load()  # raises "image file is truncated" when data is missing
    if orientation in TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return int(width), int(height)


def _orientation_from_exif_bytes(raw) -> Optional[int]:
    if not raw:
        return None
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(EXIF_ORIENTATION)

