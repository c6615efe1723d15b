"""WebDataset-style tar shards as a data source (the converter: shard_writer.py).

`--data` names shards as a brace pattern, `train-{000000..001023}.tar`
(ranges zero-padded when either end is; several braces expand left to
right; relative to the working directory), or a `.txt` list whose lines
all name `.tar` files (relative to the list's folder): both the train
split only. Or a folder of `.tar` files and nothing else: all train, or,
when some are `train-*.tar`, those train and `val-*.tar` (else `test-*`)
the test split, for the kNN monitor (the converter's `--out DIR/train`).

A sample is the run of consecutive members sharing a key (WebDataset's
rule: the name up to the first '.' of its last path part). Its image is
its first image member in tar order; its label the integer in its `.cls`
member, else its key's prefix (before the first '/', failing that before
the last '_'; classes sorted). With `.cls` labels the class names are the
key prefixes when each label has exactly one.

The index (`index_shards`) reads every tar header once (512 bytes each,
the data skipped), probes each image as the file index does (the same
`probe_file`), and caches the member table under `cache_root()/index/`,
valid while each shard's size and mtime stay (one stat per shard); a
changed shard alone is read again. Reads are one `os.preadv` per image
from a per-process, thread-safe LRU of open shards (`_FILES`, at most
MAX_OPEN_SHARDS), emptied in a forked child; a pickled Source holds no fds.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import os
import re
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from tqdm import tqdm

from .data import FILE_LIST_EXTENSIONS, IMAGE_EXTENSIONS, DataError, Source, cache_root
from .index import join_paths, probe_file, probe_many, split_paths, write_cache

MAX_OPEN_SHARDS = 64
SHARD_INDEX_VERSION = 1
_BLOCK = 512
_SCAN_CHUNK = 32 * 1024  # a header read takes this much: small members come several to a read
_PROBE_THREADS = 8
_PROBE_BUFFER = 16 * 1024
_BRACE = re.compile(r"\{([^{}]*)\}")


# ---------------------------------------------------------------- which shards
def expand_braces(pattern: str) -> list:
    """`a{0..2}b{x,y}` -> a0bx a0by a1bx ...; ranges zero-padded when either end is."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.groups()
        if int(hi) < int(lo):
            raise DataError(f"{pattern}: the range {{{body}}} runs backwards")
        padded = (len(lo) > 1 and lo[0] == "0") or (len(hi) > 1 and hi[0] == "0")
        width = max(len(lo), len(hi)) if padded else 0
        items = [str(k).zfill(width) for k in range(int(lo), int(hi) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"{pattern}: cannot expand {{{body}}}; use {{000..099}} or {{a,b}}")
    rest = expand_braces(pattern[m.end():])
    return [pattern[:m.start()] + item + tail for item, tail in itertools.product(items, rest)]


def _is_tar(path: str) -> bool:
    return path.lower().endswith(".tar")


def shard_paths(data: str, split: str = "train") -> Optional[list]:
    """The absolute paths of `split`'s shards in `data` (empty when it has
    no such split), or None when `data` names no shards."""
    text = os.path.expanduser(str(data))
    if os.path.isdir(text):
        return _folder_split(text, split)
    if _BRACE.search(text) or _is_tar(text):
        paths = [os.path.abspath(p) for p in expand_braces(text)]
        if not all(map(_is_tar, paths)):
            return None
        return paths if split == "train" else []
    if os.path.isfile(text) and os.path.splitext(text)[1].lower() in FILE_LIST_EXTENSIONS:
        base = os.path.dirname(os.path.abspath(text))
        with open(text, encoding="utf-8") as f:
            lines = (s.strip() for s in f)
            lines = (s for s in lines if s and not s.startswith("#"))
            first = next(lines, None)
            if first is None or not _is_tar(first):
                return None  # an image file list (its first line decides; it may be long)
            lines = [first, *lines]
        if not all(map(_is_tar, lines)):
            raise DataError(f"{data}: its first line names a .tar shard, so every line must; "
                            f"{next(s for s in lines if not _is_tar(s))!r} does not")
        return [os.path.abspath(os.path.join(base, os.path.expanduser(s))) for s in lines] if split == "train" else []
    return None


def _folder_split(folder: str, split: str) -> Optional[list]:
    """A folder of shards (and nothing else): split by the names `train-*`
    and `val-*` or `test-*` when some are `train-*`, else all train."""
    with os.scandir(folder) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    tars = sorted(os.path.abspath(e.path) for e in entries if _is_tar(e.name) and e.is_file())
    if not tars or any(e.is_dir() or os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS for e in entries):
        return None
    named = {prefix: [p for p in tars if os.path.basename(p).startswith(prefix + "-")]
             for prefix in ("train", "val", "test")}
    if not named["train"]:
        return tars if split == "train" else []
    return named["train"] if split == "train" else (named["val"] or named["test"])


def open_shards(data: str, paths: list, cache_dir=None, progress: bool = True, split: str = "train") -> Source:
    """The Source of `split`'s shards `paths` (from `shard_paths(data, split)`)."""
    stats = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            raise DataError(f"{data}: shard {path} not found (the first missing of {len(paths):,} shards)") from None
        stats.append((st.st_size, st.st_mtime_ns))
    return index_shards(data, paths, np.array(stats, dtype=np.int64).reshape(-1, 2), cache_dir, progress, split)


# ---------------------------------------------------------------- reading members
class _ShardFiles:
    """This process's open shard files, the least recently used closed first.

    A file evicted while another thread reads it is closed by that reader when
    it is done. A forked child starts empty (os.register_at_fork): it never
    shares a lock or an LRU with its parent."""

    def __init__(self, limit: int):
        self.limit = limit
        self._reset()

    def _reset(self):
        self.lock = threading.Lock()
        self.open = OrderedDict()  # path -> [fd, readers, evicted]

    def _after_fork(self):
        for fd, _, _ in self.open.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._reset()

    def read(self, path: str, offset: int, size: int) -> np.ndarray:
        """`size` bytes at `offset` of `path` as a writable uint8 array, one preadv."""
        out = np.empty(size, dtype=np.uint8)
        got = self.read_into(path, offset, out) if size else 0
        if got != size:
            raise OSError(f"{path}: {size:,} bytes at {offset:,} asked, {got:,} there (shard truncated?)")
        return out

    def read_into(self, path: str, offset: int, buffer) -> int:
        entry = self._acquire(path)
        try:
            return os.preadv(entry[0], [buffer], offset)
        finally:
            self._release(entry)

    def _acquire(self, path: str) -> list:
        with self.lock:
            entry = self.open.get(path)
            if entry is not None:
                self.open.move_to_end(path)
                entry[1] += 1
                return entry
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        with self.lock:
            entry = self.open.get(path)
            if entry is not None:  # another thread opened it meanwhile
                os.close(fd)
            else:
                entry = self.open[path] = [fd, 0, False]
                while len(self.open) > self.limit:
                    _, old = self.open.popitem(last=False)
                    old[2] = True
                    if old[1] == 0:
                        os.close(old[0])
            entry[1] += 1
            return entry

    def _release(self, entry: list) -> None:
        with self.lock:
            entry[1] -= 1
            if entry[2] and entry[1] == 0:
                os.close(entry[0])


_FILES = _ShardFiles(MAX_OPEN_SHARDS)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_FILES._after_fork)


class Members:
    """Where each image of a shard Source lies: its shard, the byte offset of
    its data and its size. Pickles as these arrays alone."""

    def __init__(self, shards: list, shard: np.ndarray, offset: np.ndarray, size: np.ndarray):
        self.shards, self.shard, self.offset, self.size = list(shards), shard, offset, size

    def read(self, i: int) -> np.ndarray:
        return _FILES.read(self.shards[self.shard[i]], int(self.offset[i]), int(self.size[i]))

    def take(self, keep) -> "Members":
        keep = np.asarray(keep, dtype=np.int64)
        return Members(self.shards, self.shard[keep], self.offset[keep], self.size[keep])


class _MemberIO(io.RawIOBase):
    """A member as a read-only file (for the header probe), read through `_FILES`."""

    def __init__(self, path: str, offset: int, size: int):
        super().__init__()
        self.path, self.offset, self.size, self.pos = path, offset, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = max(0, pos + (0, self.pos, self.size)[whence])
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.size - self.pos))
        if n:
            n = _FILES.read_into(self.path, self.offset + self.pos, memoryview(b)[:n])
            self.pos += n
        return n


def probe_member(path: str, offset: int, size: int) -> tuple:
    """`index.probe_image` of one member: (width, height), or (-1, -1)."""
    try:
        with io.BufferedReader(_MemberIO(path, offset, size), _PROBE_BUFFER) as f:
            return probe_file(f, size)
    except Exception:  # PIL raises many kinds
        return -1, -1


# ---------------------------------------------------------------- the tar headers
def _number(field: bytes) -> int:
    """An octal header field (GNU base-256 for 8 GiB and over); -1 when it is not a number."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    try:
        return int(field, 8) if field else 0
    except ValueError:
        return -1


def _pax(data: bytes) -> dict:
    """A pax extended header's `len key=value\\n` records."""
    out, at = {}, 0
    while at < len(data):
        length = int(data[at:data.index(b" ", at)])
        key, _, value = data[data.index(b" ", at) + 1:at + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        at += length
    return out


def scan_tar(path: str):
    """(name, data offset, size) of every regular file in the tar at `path`,
    in order: one 512-byte header read per member (its data skipped), pax and
    GNU long names and sizes honoured."""
    with open(path, "rb", buffering=0) as f:
        fd, end = f.fileno(), os.fstat(f.fileno()).st_size
        buf, buf_at, at, pending = b"", 0, 0, {}
        while at + _BLOCK <= end:
            if not (buf_at <= at and at + _BLOCK <= buf_at + len(buf)):
                buf, buf_at = os.pread(fd, _SCAN_CHUNK, at), at
            header = buf[at - buf_at:at - buf_at + _BLOCK]
            if header.count(0) == _BLOCK:
                break  # the end-of-archive blocks
            if _number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
                raise DataError(f"{path}: not a tar file, or damaged at byte {at:,} (header checksum)")
            size, kind = _number(header[124:136]), header[156:157]
            data_at = at + _BLOCK
            if kind in (b"x", b"L"):
                raw = os.pread(fd, size, data_at)
                pending.update(_pax(raw) if kind == b"x" else {"path": raw.rstrip(b"\0").decode(
                    "utf-8", "surrogateescape")})
            elif kind in (b"0", b"\0", b"7"):
                size = int(pending.get("size", size))
                name = pending.get("path")
                if name is None:
                    name = header[:100].split(b"\0", 1)[0]
                    if header[257:263] == b"ustar\0" and header[345]:  # POSIX ustar: a name prefix
                        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
                    name = name.decode("utf-8", "surrogateescape")
                yield name, data_at, size
                pending = {}
            elif kind not in (b"g", b"K"):  # a global header, a GNU long link name: for later members
                pending = {}  # directories, links, devices: not samples
            at = data_at + -(-size // _BLOCK) * _BLOCK
        else:
            if at < end:
                raise DataError(f"{path}: ends inside a tar header at byte {at:,} (truncated?)")


def _key(name: str) -> tuple:
    """WebDataset's (key, extension): the name up to the first '.' of its last part."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def _samples(path: str, read_small) -> tuple:
    """(image member names, offsets, sizes, .cls labels (-1: none)) of one
    shard's samples; a sample without an image has size -1 (left out, counted)."""
    names, offsets, sizes, cls = [], [], [], []
    last = None
    for name, at, size in scan_tar(path):
        key, ext = _key(name)
        if key != last:
            last = key
            names.append(name)
            offsets.append(at)
            sizes.append(-1)
            cls.append(-1)
        suffix = os.path.splitext(name)[1].lower()
        if sizes[-1] < 0 and suffix in IMAGE_EXTENSIONS:
            names[-1], offsets[-1], sizes[-1] = name, at, size
        elif ext == "cls" and size <= 64:
            text = read_small(at, size).strip()
            cls[-1] = int(text) if text.isdigit() else -1
    return names, offsets, sizes, cls


def _scan_headers(path: str) -> dict:
    """One shard's samples from its headers (and .cls members), not yet probed."""
    try:
        with open(path, "rb", buffering=0) as f:
            names, offsets, sizes, cls = _samples(path, lambda at, n: os.pread(f.fileno(), n, at))
    except OSError as e:
        raise DataError(f"{path}: cannot read this shard: {e.strerror or e}") from None
    return {"names": names, "offsets": np.array(offsets, np.int64), "sizes": np.array(sizes, np.int64),
            "cls": np.array(cls, np.int64)}


def _probe_tables(paths: list, tables: list, progress: bool, shown: str) -> None:
    """Set 'widths' and 'heights' of each shard's table (index.probe_many)."""
    shard = np.repeat(np.arange(len(tables)), [len(t["sizes"]) for t in tables])
    offsets = np.concatenate([t["offsets"] for t in tables])
    sizes = np.concatenate([t["sizes"] for t in tables])

    def probe_one(i: int) -> tuple:
        return probe_member(paths[shard[i]], int(offsets[i]), int(sizes[i])) if sizes[i] >= 0 else (-1, -1)
    widths, heights = probe_many(len(sizes), probe_one, progress, shown)
    bounds = np.cumsum([0] + [len(t["sizes"]) for t in tables])
    for t, lo, hi in zip(tables, bounds[:-1], bounds[1:]):
        t["widths"], t["heights"] = widths[lo:hi], heights[lo:hi]


# ---------------------------------------------------------------- the index
_TABLE = ("offsets", "sizes", "cls", "widths", "heights")


def _cache_file(paths: list, cache_dir):
    key = hashlib.sha1(repr(("shards", paths)).encode("utf-8", "surrogateescape")).hexdigest()
    return cache_root(cache_dir) / "index" / f"{key}.npz"


def _load(cache_file) -> dict:
    """{shard path: (size, mtime, table)} of a cached index; {} when absent or stale."""
    try:
        with np.load(cache_file) as z:
            if int(z["version"]) != SHARD_INDEX_VERSION:
                return {}
            z = {k: z[k] for k in z.files}
    except (OSError, KeyError, ValueError, EOFError):
        return {}
    names, out = split_paths(z["names"]), {}
    bounds = np.searchsorted(z["shard"], np.arange(len(z["stats"]) + 1))
    for k, path in enumerate(split_paths(z["shards"])):
        lo, hi = bounds[k], bounds[k + 1]
        out[path] = (tuple(z["stats"][k]), {"names": names[lo:hi], **{c: z[c][lo:hi] for c in _TABLE}})
    return out


def _save(cache_file, paths: list, stats: np.ndarray, tables: list) -> None:
    """Write the table of every shard (index.write_cache: atomic)."""
    names = [n for t in tables for n in t["names"]]
    arrays = {c: np.concatenate([t[c] for t in tables]) for c in _TABLE}
    shard = np.repeat(np.arange(len(tables), dtype=np.int32), [len(t["names"]) for t in tables])
    write_cache(cache_file, "shard index", version=np.int64(SHARD_INDEX_VERSION), stats=stats, shard=shard,
                shards=join_paths(paths), names=join_paths(names), **arrays)


def _labels(names: list, cls: np.ndarray) -> tuple:
    """(labels, classes): from .cls when any sample has one, else from key prefixes."""
    keys = [_key(n)[0] for n in names]
    prefixes = [k.split("/", 1)[0] if "/" in k else (k.rsplit("_", 1)[0] if "_" in k else None) for k in keys]
    if (cls >= 0).any():
        classes = [str(k) for k in range(int(cls.max()) + 1)]
        named = {}
        for label, prefix in zip(cls.tolist(), prefixes):
            if label >= 0:
                named.setdefault(label, set()).add(prefix)
        one = {label: next(iter(p)) for label, p in named.items() if len(p) == 1 and None not in p}
        if len(one) == len(named) and len(set(one.values())) == len(one):
            classes = [one.get(k, str(k)) for k in range(len(classes))]
        return cls.copy(), classes
    classes = sorted({p for p in prefixes if p is not None})
    position = {c: k for k, c in enumerate(classes)}
    return np.array([position.get(p, -1) for p in prefixes], dtype=np.int64), classes


def index_shards(data: str, paths: list, stats: np.ndarray, cache_dir=None, progress: bool = True,
                 split: str = "train") -> Source:
    """The Source of the shards `paths` whose (size, mtime) are `stats`: the
    cached table of each unchanged shard, the headers and probe of the rest."""
    cache_file = _cache_file(paths, cache_dir)
    cached = _load(cache_file)
    tables, todo = [], []
    for k, path in enumerate(paths):
        hit = cached.get(path)
        if hit is not None and hit[0] == tuple(stats[k]):
            tables.append(hit[1])
        else:
            tables.append(None)
            todo.append(k)
    if todo:
        if cached:
            print(f"index of {data}: re-reading {len(todo):,} of {len(paths):,} shards (new or changed)",
                  file=sys.stderr)
        with tqdm(total=len(todo), desc=f"reading tar headers of {data}", unit="shard", disable=not progress,
                  leave=False, file=sys.stderr) as bar, ThreadPoolExecutor(min(_PROBE_THREADS, len(todo))) as pool:
            fresh = []
            for table in pool.map(_scan_headers, [paths[k] for k in todo]):
                fresh.append(table)
                bar.update()
        _probe_tables([paths[k] for k in todo], fresh, progress, data)
        for k, table in zip(todo, fresh):
            tables[k] = table
        _save(cache_file, paths, stats, tables)
    return _source(data, split, paths, stats, tables)


def _source(data: str, split: str, paths: list, stats: np.ndarray, tables: list) -> Source:
    names = [n for t in tables for n in t["names"]]
    table = {c: np.concatenate([t[c] for t in tables]) for c in _TABLE}
    shard = np.repeat(np.arange(len(tables), dtype=np.int32), [len(t["names"]) for t in tables])
    if not names:
        raise DataError(f"{data}: the {len(paths):,} shards hold no samples")
    usable = table["widths"] >= 0
    skipped = len(names) - int(usable.sum())
    if not usable.any():
        raise DataError(f"{data}: none of the {len(names):,} samples has a readable image "
                        f"(e.g. {paths[shard[0]]}:{names[0]}); expected JPEG, PNG, BMP, WebP or TIFF members")
    if skipped:
        at = int(np.flatnonzero(~usable)[0])
        print(f"warning: skipped {skipped:,} unreadable or image-less {'sample' if skipped == 1 else 'samples'} "
              f"of {len(names):,} in {data} (e.g. {paths[shard[at]]}:{names[at]})", file=sys.stderr)
    keep = np.flatnonzero(usable)
    labels, classes = _labels([names[i] for i in keep], table["cls"][keep])
    fingerprint = hashlib.sha1(join_paths(paths) + stats.tobytes() + table["offsets"].tobytes()
                               + table["sizes"].tobytes()).hexdigest()[:16]
    return Source(name=data, split=split, paths=[f"{paths[shard[i]]}:{names[i]}" for i in keep],
                  labels=labels, widths=table["widths"][keep].astype(np.int32),
                  heights=table["heights"][keep].astype(np.int32), classes=classes, skipped=skipped,
                  fingerprint=fingerprint,
                  members=Members(paths, shard[keep], table["offsets"][keep], table["sizes"][keep]))
