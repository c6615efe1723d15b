"""bench/scale.py's real files: a work dir of small JPEGs, grown once and
reused between runs.

    <work>/pool/c0000 ... c0999/00000000.jpg ...   file i in class i % 1000, grown to the largest N
    <work>/pool/COUNT                              how many of them are complete
    <work>/n<N>/c..../<i>.jpg                      hard links to the pool's first N files: the ImageFolder of N
    <work>/cache/                                  the index and .beton cache of the parts that need one

File i's bytes are variant i % 16 of a few distinct JPEGs (varied sizes
and content), written, not encoded, per file; so N = 10k, 100k and 1.28M
share files: each is the first N of the bigger set.
"""
from __future__ import annotations

import io
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = 1000
VARIANTS = 16
BYTES_PER_FILE = 4096 + 512  # a block and an inode's share, for the disk check
BYTES_PER_LINK = 64          # a directory entry


def jpeg_variants(count: int = VARIANTS, seed: int = 0) -> list:
    """`count` distinct JPEG byte strings, 48-76 x 36-57 px, smooth to noisy."""
    from PIL import Image
    g = np.random.default_rng(seed)
    out = []
    for k in range(count):
        w, h = 48 + 4 * (k % 8), 36 + 3 * (k % 8) + 3 * (k // 8)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1)
        noise = g.normal(0, 6 * (k % 6), (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85 + k % 10)
        out.append(buf.getvalue())
    return out


def write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class WorkDir:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser()
        self.pool, self.cache = self.root / "pool", self.root / "cache"
        self.created = []  # {"what", "files", "seconds"} of this run

    def count(self) -> int:
        try:
            return int((self.pool / "COUNT").read_text())
        except (OSError, ValueError):
            return 0

    def largest_fitting(self, wanted: int) -> tuple[int, str]:
        """The largest N <= wanted whose files and links fit 90% of the free
        disk space and inodes, and the statement of the check."""
        self.root.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(self.root)
        free, inodes = st.f_bavail * st.f_frsize, st.f_favail
        have = self.count()
        fits = wanted
        while fits > have:
            files = fits - have
            need_bytes = files * BYTES_PER_FILE + 2 * fits * BYTES_PER_LINK
            if need_bytes <= 0.9 * free and files + CLASSES <= 0.9 * inodes:
                break
            fits = max(have, int(fits * 0.9))
        return fits, (f"{self.root}: {free / 1e9:.1f} GB and {inodes:,} inodes free, {have:,} files there; "
                      f"real files up to N = {fits:,} (of {wanted:,} wanted)")

    def grow(self, n: int) -> None:
        """The pool holds at least n files (written from where it stopped)."""
        have = self.count()
        if have >= n:
            return
        variants = jpeg_variants()
        for c in range(min(CLASSES, n)):
            (self.pool / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        for i in range(have, n):
            write_file(str(self.pool / f"c{i % CLASSES:04d}" / f"{i:08d}.jpg"), variants[i % VARIANTS])
            if (i + 1) % 100_000 == 0:
                print(f"  wrote {i + 1:,} of {n:,} files", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - start
        (self.pool / "COUNT").write_text(str(n))
        self.created.append({"what": "files written", "files": n - have, "seconds": seconds})

    def tree(self, n: int) -> Path:
        """The ImageFolder of the pool's first n files (made once: hard links)."""
        dest = self.root / f"n{n}"
        if dest.is_dir():
            return dest
        self.grow(n)
        tmp = self.root / f".n{n}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        start = time.perf_counter()
        for c in range(min(CLASSES, n)):
            (tmp / f"c{c:04d}").mkdir(parents=True)
        for i in range(n):
            name = f"c{i % CLASSES:04d}/{i:08d}.jpg"
            os.link(self.pool / name, tmp / name)
        os.replace(tmp, dest)
        self.created.append({"what": f"links of n{n}", "files": n, "seconds": time.perf_counter() - start})
        return dest
