"""The image index's two halves that need no Source: probing files and the cache file.

`probe_image` / `probe_bytes` find each file's size as decoded (after EXIF
orientation, as DALI decodes) or that it would stop a pipeline (empty, not
an image, truncated JPEG, corrupt PNG); `load_index` / `save_index` keep
the results of a source's probe under `cache_root()/index/`, keyed by its
paths, sizes and mtimes. pipelines/data.py's `index_source` uses both.
"""
from __future__ import annotations

import io
import os
import pathlib
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

INDEX_VERSION = 1
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # 90-degree turns: width and height swap
_JPEG_EOI = b"\xff\xd9"
# Inside entropy-coded data 0xFF is always followed by 0x00 or a restart
# marker, so FF D9 near the end can only be the real end-of-image marker.
_JPEG_TAIL_BYTES = 1024
_PROBE_CHUNK = 128
_PROBE_THREADS = 8  # header reads wait on I/O; more threads than cores pays off
_UNUSABLE = (-1, -1)


# ---------------------------------------------------------------- the cache file
def join_paths(paths: list) -> bytes:
    return "\0".join(paths).encode("utf-8", "surrogateescape")


def split_paths(blob: np.ndarray) -> list:
    raw = blob.tobytes()
    return raw.decode("utf-8", "surrogateescape").split("\0") if raw else []


def load_index(cache_file: pathlib.Path) -> Optional[dict]:
    try:
        with np.load(cache_file) as z:
            if int(z["version"]) != INDEX_VERSION:
                return None
            return {k: z[k] for k in ("paths", "sizes", "mtimes", "widths", "heights")}
    except (OSError, KeyError, ValueError, EOFError):
        return None  # absent, from another version, or damaged: rebuild


def save_index(cache_file: pathlib.Path, blob: bytes, sizes, mtimes, widths, heights) -> None:
    """Write atomically; a cache that cannot be written only costs time on the next open."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=cache_file.stem + ".", suffix=".tmp", dir=cache_file.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, version=np.int64(INDEX_VERSION), paths=np.frombuffer(blob, dtype=np.uint8),
                                sizes=sizes, mtimes=mtimes, widths=widths, heights=heights)
        os.replace(tmp, cache_file)
    except OSError as e:
        print(f"warning: could not write the image index cache {cache_file}: {e}", file=sys.stderr)



# ---------------------------------------------------------------- probing
def probe_all(paths: list, sizes: np.ndarray, progress: bool, shown: str) -> list:
    """`probe_image` over many files on a thread pool, in order, with a progress bar."""
    if len(paths) <= _PROBE_CHUNK:
        return [probe_image(p, int(s)) for p, s in zip(paths, sizes)]
    chunks = [(paths[i:i + _PROBE_CHUNK], sizes[i:i + _PROBE_CHUNK]) for i in range(0, len(paths), _PROBE_CHUNK)]
    results = []
    with tqdm(total=len(paths), desc=f"indexing {shown}", unit="img", disable=not progress, leave=False,
              file=sys.stderr) as bar, ThreadPoolExecutor(_PROBE_THREADS) as pool:
        for chunk_result in pool.map(lambda c: [probe_image(p, int(s)) for p, s in zip(*c)], chunks):
            results += chunk_result
            bar.update(len(chunk_result))
    return results


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
            return _probe(f, size)
    except Exception:  # PIL raises many kinds (OSError, SyntaxError, ValueError, struct.error...)
        return _UNUSABLE


def probe_bytes(data) -> tuple:
    """`probe_image` of an encoded file already in memory (bytes or a uint8 array)."""
    try:
        return _probe(io.BytesIO(memoryview(data).cast("B")), len(data))
    except Exception:
        return _UNUSABLE


def _probe(f, size: int) -> tuple:
    if size == 0:
        return _UNUSABLE
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


# ---------------------------------------------------------------- photo folder
