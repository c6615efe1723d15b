"""FFCV pipeline: the plan rendered inside FFCV's compiled pipeline, one decode per image.

Writing a `.beton` (once per source; `--pipeline ffcv` does it by itself
into the cache, keyed and validated like the index):

    python -m pipelines.ffcv write --data SOURCE --out FILE.beton [--jpeg-quality 90] [--max-side N]

SOURCE is anything train.py's `--data` takes (an ImageFolder, a .txt file
list, `fashion-mnist`, nothing or `sample` for the built-in sample). The
index has already left out the files that cannot be read (empty, truncated,
garbage); the writer decodes the rest as the reference does
(pipelines/render.py `decode`: EXIF orientation, 16-bit, CMYK, grey,
palette, alpha) and stores each one so that turbojpeg or a copy gives those
pixels back: a plain RGB or grey JPEG keeps its own bytes (bit-exact with
PIL), an image that is not a JPEG is stored raw when it has at most
`raw_max_pixels` pixels (lossless) and as a JPEG of `--jpeg-quality`
otherwise, and everything converted or shrunk by `--max-side` is
re-encoded. A file that still fails is skipped with a count. Each record
keeps its position in the source, so the loader maps samples back.

Per step (batch B), in FFCV's compiled stage (Numba, `prange` over the
batch on `workers` threads):

    record ─► Decode: turbojpeg once per image (accurate DCT, like PIL), or a copy of raw pixels
      ├─► Render(family 1): per view, the plan's window resampled as PIL's
      │     antialiased bilinear resize does (bit for bit), flipped, then
      │     pipelines/colour.py's `render` (jitter, grayscale, blur,
      │     solarize, normalisation) into float32
      ├─► Render(family 2) ...             (FFCV branches: PipelineSpec(source=<the decoder>))
      └─► Render(mosaic tiles) ─► Paste: the canvases by the plan's paste table

The order of every epoch is the plan's, through a traversal order that
hands FFCV the rank's shard from the loader's position (mid-epoch resume
starts there), each step's batch being the plan's `index`: with CLIM's
neighbours, the B anchors then the B images the table names, decoded once
each and rendered like any other row. The step's parameters (windows, flips, colour vectors, paste
tables) reach the compiled operations as data: each operation declares a
parameter buffer beside its output, and the epoch iterator writes step s's
plan into the buffers of the batch slot it is about to render, so nothing
is frozen into the compiled code (Numba would freeze global arrays).

This module is the loader, `write_beton` / `ensure_beton` and the command
line; the compiled stage and what drives FFCV's loader are
pipelines/ffcv_stage.py, the writer's processes and records
pipelines/ffcv_writer.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import queue
import sys
import tempfile
from typing import Iterator, Optional

import numba
import numpy as np
import torch

# FFCV's Compiler.set_num_threads(n) sets torch's thread count too, which is
# process-wide: FFCV calls it on import (n = 1), when a loader is built and
# from its epoch thread. The model would run on FFCV's thread count, so every
# call here gives torch its own count back.
_TORCH_THREADS, _NUMBA_THREADS = torch.get_num_threads(), numba.get_num_threads()
from ffcv.fields import IntField, RGBImageField
from ffcv.pipeline import PipelineSpec
from ffcv.reader import Reader

torch.set_num_threads(_TORCH_THREADS)
numba.set_num_threads(_NUMBA_THREADS)  # thread-local in Numba: this (importing) thread's

from . import colour, ffcv_stage
from .base import PipelineError, PlannedLoader
from .data import DataError, Source, cache_root
from .ffcv_writer import CHUNK, Records, WorkerFailed, Writer, page_size, stored_size
from .plan import BatchPlan, CropPlan
from .render import place_family, view_families
from .views import Views

BETON_VERSION = 1
DEFAULT_QUALITY = 90
RAW_MAX_PIXELS = 512 * 512


# ---------------------------------------------------------------- the loader
class FfcvLoader(PlannedLoader):
    """The plan rendered by FFCV from a `.beton` of the source (built once
    into the cache unless `beton` names one). On the CPU the compiled stage
    renders every view normalised; with a CUDA device it only decodes and
    resamples, and pipelines/colour.py's CUDA kernel colours every view of a
    family in one launch."""
    name = "ffcv"
    capabilities = frozenset({"crops", "asymmetric", "original", "mosaic", "pairs", "neighbours"})

    def __init__(self, spec, source, *, beton: Optional[str] = None, cache_dir: Optional[str] = None,
                 jpeg_quality: int = DEFAULT_QUALITY, max_side: Optional[int] = None,
                 batches_ahead: int = 2, colour_on_device: Optional[bool] = None, **kw):
        path = beton or ensure_beton(source, cache_dir=cache_dir, jpeg_quality=jpeg_quality, max_side=max_side)
        reader = Reader(str(path))
        position = reader.metadata["f1"].astype(np.int64)  # each record's position in the source, -1: skipped
        if len(position) != len(source) or (position >= len(source)).any():
            raise PipelineError(f"ffcv: {path} holds {len(position)} records, {source.name} has {len(source)} "
                                "images; write it again from this source")
        self._record = np.flatnonzero(position >= 0)  # the loader's sample i is record _record[i]
        if len(self._record) != len(source):
            source = _subset(source, position[self._record])
        meta = reader.metadata["f0"][self._record]
        self.decoded_w, self.decoded_h = meta["width"].astype(np.int64), meta["height"].astype(np.int64)
        expect_w, expect_h = stored_size(source.widths, source.heights, max_side)
        if not (np.array_equal(self.decoded_w, expect_w) and np.array_equal(self.decoded_h, expect_h)):
            raise PipelineError(f"ffcv: the image sizes in {path} disagree with the index of {source.name}; "
                                "write it again from this source")
        super().__init__(spec, source, **kw)
        self.path = str(path)
        # on a GPU, colour runs batched on it; `colour_on_device=True` on the
        # CPU runs the same kernels in Numba's CUDA simulator (tests)
        self.colour_on_device = self.device.type == "cuda" if colour_on_device is None else bool(colour_on_device)
        self._groups = view_families(spec)
        self._batches_ahead = int(batches_ahead)
        self._ffcv, self._running, self._compiled = None, None, False

    def _build(self):
        """FFCV's loader: one decoder, one branch per view family (compiled here, once)."""
        decoder = ffcv_stage.Decode()
        specs, self._ops = {}, []
        for g, group in enumerate(self._groups):
            render = ffcv_stage.Render(group.count, group.size, self.colour_on_device)
            ops = [render]
            if group.kind == "mosaic" and not self.colour_on_device:  # else colour.paste_mosaics on the device
                ops.append(ffcv_stage.Paste(group.count, group.out_size, colour.MOSAIC_FILL_NORMALISED))
            self._ops.append(ops)
            specs["image" if g == 0 else f"views{g}"] = (
                PipelineSpec("image", decoder=decoder, transforms=ops) if g == 0
                else PipelineSpec(source=decoder, transforms=ops))
        specs["source_index"] = None  # the plan knows every index already
        self._order = ffcv_stage.PlanOrder(self.planner, self._record)
        threads = max(1, min(self.workers, numba.config.NUMBA_NUM_THREADS))
        with ffcv_stage.torch_threads_kept():
            self._ffcv = ffcv_stage.PlannedFFCVLoader(self.path, self.planner.rows, num_workers=threads, order=self._order,
                                     pipelines=specs, drop_last=False, batches_ahead=self._batches_ahead, owner=self)
        graph = self._ffcv.graph
        self._node = {op: graph.operation_to_node[op][0].id for ops in self._ops for op in ops}

    def _write_params(self, plan: BatchPlan, slot: int, memory: dict) -> None:
        """Step `plan`'s parameters into the buffers of batch slot `slot` (FFCV's thread)."""
        index = plan.index
        for group, ops in zip(self._groups, self._ops):
            cp = group.plan(plan)
            rows = memory[self._node[ops[0]]][1][slot]
            rows[:len(index)] = self._view_rows(cp, group.augs, index).transpose(1, 0, 2)
            if len(ops) > 1:
                mp = plan.mosaic
                table = memory[self._node[ops[1]]][1][slot]
                table[:len(index), :, 0] = mp.tile_src
                table[:len(index), :, 1] = mp.tile_crop
                table[:len(index), :, 2:] = mp.paste

    def _view_rows(self, cp: CropPlan, augs, index) -> np.ndarray:
        """float32 [count, B, ROW_LEN]: windows in decoded pixels (the index's
        when no --max-side shrank the images), sizes, flips, colour vectors."""
        rows = np.zeros(cp.window.shape[:2] + (ffcv_stage.ROW_LEN,), np.float32)
        dw, dh = self.decoded_w[index], self.decoded_h[index]
        window = cp.window.astype(np.int64)
        iw, ih = self.planner.widths[index], self.planner.heights[index]
        if np.array_equal(dw, iw) and np.array_equal(dh, ih):
            top, left, h, w = (window[..., i] for i in range(4))
        else:  # images shrunk at write time: the same fractions of the decoded image
            top = np.floor(window[..., 0] * dh / ih).astype(np.int64)
            left = np.floor(window[..., 1] * dw / iw).astype(np.int64)
            h = np.clip(np.rint(window[..., 2] * dh / ih).astype(np.int64), 1, dh - top)
            w = np.clip(np.rint(window[..., 3] * dw / iw).astype(np.int64), 1, dw - left)
        s = ffcv_stage
        rows[..., s.ROW_TOP], rows[..., s.ROW_LEFT], rows[..., s.ROW_HEIGHT], rows[..., s.ROW_WIDTH] = top, left, h, w
        rows[..., s.ROW_IMAGE_HEIGHT], rows[..., s.ROW_IMAGE_WIDTH] = dh, dw
        rows[..., s.ROW_FLIP] = cp.flip
        rows[..., s.ROW_COLOUR:] = colour.view_params(cp, augs, cp.size)
        return rows

    def _render(self, epoch: int, start: int) -> Iterator[Views]:
        if self._ffcv is None:
            self._build()
        self._stop()
        self._order.epoch, self._order.start = epoch, start
        it = self._running = iter(self._ffcv)
        try:
            for plan, outputs in it:
                yield self._views(plan, outputs)
            if it.error is not None:
                raise RuntimeError(f"ffcv: rendering failed: {it.error!r}") from it.error
        finally:
            self._stop()

    def _stop(self) -> None:
        """End the running epoch's thread: it plans ahead with our planner,
        which a new iteration must not share with it."""
        it, self._running = self._running, None
        if it is None:
            return
        it.close()
        while it.is_alive():  # its last put (the end marker) blocks on a full queue: drain it
            try:
                it.output_queue.get(timeout=0.05)
            except queue.Empty:
                pass

    def _views(self, plan: BatchPlan, outputs) -> Views:
        """Each family copied out of FFCV's slot buffers (reused a few steps
        later) into [count, B, H, W, C] memory, then to the device."""
        views = self.bookkeeping(plan)
        for group, pixels in zip(self._groups, outputs):
            pixels = torch.from_numpy(pixels)  # [B, count, s, s, 3]; the CPU's canvases [B, S, S, 3]
            if self.colour_on_device:
                out = self._colour_on_device(group, plan, pixels)
            else:
                if group.kind == "mosaic":
                    pixels = pixels[:, None]
                out = torch.empty(pixels.shape[1:2] + pixels.shape[:1] + pixels.shape[2:], dtype=torch.float32,
                                  pin_memory=self.device.type == "cuda")  # so its copy to a GPU does not block
                out.copy_(pixels.transpose(0, 1))
                out = out.to(self.device, self.dtype, non_blocking=True).movedim(-1, -3)
                if group.kind == "mosaic":
                    out = out[0]
            place_family(views, group, out)
        return views

    def _colour_on_device(self, group, plan: BatchPlan, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles [B, count, s, s, 3] -> normalised [count, B, 3, s, s]
        (the mosaic [B, 3, S, S]) by pipelines/colour.py's CUDA kernels,
        as DALI's GPU graph does (colour.render_group)."""
        staged = torch.empty(tiles.shape[1:2] + tiles.shape[:1] + tiles.shape[2:], dtype=torch.uint8,
                             pin_memory=self.device.type == "cuda")  # pageable memory would make the copy block
        staged.copy_(tiles.transpose(0, 1))
        on_device = staged.to(self.device, non_blocking=True)
        return colour.render_group(group, plan, on_device, self.dtype)

    def close(self) -> None:
        self._stop()
        self._ffcv = None
        super().close()


def _subset(source: Source, keep: np.ndarray) -> Source:
    return Source(name=source.name, split=source.split, paths=[source.paths[i] for i in keep],
                  labels=source.labels[keep], widths=source.widths[keep], heights=source.heights[keep],
                  classes=source.classes, skipped=source.skipped + len(source) - len(keep),
                  members=None if source.members is None else source.members.take(keep))


# ---------------------------------------------------------------- the writer
def _stored_image_field() -> RGBImageField:
    """FFCV's RGBImageField (so that any FFCV reads the file) whose records
    arrive ready: (mode, width, height, bytes)."""
    field = RGBImageField()
    field.encode = _encode_record
    return field


def _encode_record(destination, record, malloc):
    """One record into FFCV's metadata and page; `Records` made sure it fits a page."""
    mode, width, height, payload = record
    destination["mode"], destination["width"], destination["height"] = mode, width, height
    destination["data_ptr"], storage = malloc(payload.nbytes)
    storage[:] = payload


def _file_sizes(source: Source) -> list:
    """Bytes of each image: a tar member's from the index, a file's from one stat."""
    if source.members is not None:
        return source.members.size.tolist()
    return [_file_size(p) for p in source.paths]


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # gone since indexing: the worker finds it and skips it
        return 0


def write_beton(source: Source, out, *, jpeg_quality: int = DEFAULT_QUALITY, max_side: Optional[int] = None,
                raw_max_pixels: int = RAW_MAX_PIXELS, workers: Optional[int] = None) -> dict:
    """Write `source` as a .beton at `out` atomically (a temporary file in the
    same folder, then a rename), with FFCV's progress bar. Returns
    {'written', 'skipped_index', 'skipped_write'}: images stored, files the
    index had left out, files that failed to decode here.

    Page size: FFCV stores each record inside one page. The page is the
    smallest power of two that holds the largest file (one stat per file; a
    kept JPEG is stored as its file), 8 MiB (FFCV's default) at least, under
    4 GiB. A re-encoded image larger than that page (rare: a converted or
    non-JPEG image that compresses worse than the largest file) is found
    while writing, and the write is done once more with a page that holds it.
    A larger page costs file size: each page is written whole, so the
    padding before the first page, each worker's last page and the unused
    tails of pages grow with it. Reading maps the file (FFCV's os_cache, the
    loader's default), where the page size does not enter.

    A writer worker that fails for any reason (an exception, a signal, the
    OOM killer) ends the write within seconds with a DataError naming the
    file it was writing; no worker outlives the call."""
    out = pathlib.Path(out).expanduser()
    if not 1 <= int(jpeg_quality) <= 100:
        raise DataError(f"--jpeg-quality must lie in 1..100, not {jpeg_quality}")
    if max_side is not None and max_side < 1:
        raise DataError(f"--max-side must be positive, not {max_side}")
    if not len(source):
        raise DataError(f"{source.name}: no images to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        workers = min(workers or max(1, min(8, os.cpu_count() or 1)), -(-len(source) // CHUNK))
        fields = {"image": _stored_image_field(), "source_index": IntField()}
        sizes = _file_sizes(source)
        largest = int(np.argmax(sizes))
        page = page_size(sizes[largest], source.paths[largest])
        for attempt in range(2):
            records = Records(source, int(jpeg_quality), max_side, raw_max_pixels, page)
            Writer(tmp, fields, page_size=page, num_workers=workers).write(records)
            need, at = records.oversized
            if not need:
                break
            if attempt:
                raise DataError(f"{source.paths[at]}: its record grew to {need:,} bytes while {out} was written; "
                                "write it again")
            page, was = page_size(need, source.paths[at]), page
            print(f"note: {source.paths[at]} takes {need:,} bytes once re-encoded, more than the {was:,}-byte "
                  f"page the largest file asked for; writing {out} again with {page:,}-byte pages", file=sys.stderr)
        failed = int((Reader(tmp).metadata["f1"] < 0).sum())
        if failed == len(source):
            raise DataError(f"{source.name}: none of its {len(source)} images could be decoded")
        os.replace(tmp, out)
    except WorkerFailed as e:
        position, reason = e.args
        where = f" on {source.paths[position]}" if position >= 0 else ""
        raise DataError(f"writing {out} failed{where}: {reason}") from None
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if failed:
        print(f"warning: skipped {failed} file(s) of {source.name} that failed to decode", file=sys.stderr)
    return {"written": len(source) - failed, "skipped_index": source.skipped, "skipped_write": failed}


def _stamp(source: Source, options: dict) -> str:
    """What the cached .beton was written from: the source's fingerprint
    (every listed path, size and mtime as the index saw them, so no file is
    stat-ed here), the paths kept and their indexed sizes, the options. A
    Source made without an index (no fingerprint) gets one stat per file."""
    h = hashlib.sha1(json.dumps({"version": BETON_VERSION, **options}, sort_keys=True).encode())
    h.update(source.fingerprint.encode() + b"\0" + "\0".join(source.paths).encode("utf-8", "surrogateescape"))
    h.update(np.ascontiguousarray(source.widths, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(source.heights, dtype=np.int64).tobytes())
    if not source.fingerprint:
        for path in source.paths:
            st = os.stat(path)
            h.update(f"{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def ensure_beton(source: Source, *, cache_dir: Optional[str] = None, jpeg_quality: int = DEFAULT_QUALITY,
                 max_side: Optional[int] = None) -> pathlib.Path:
    """The cached .beton of `source`, written once: named like the index
    (a hash of what the source is), valid while the stamp of its files matches."""
    options = {"jpeg_quality": int(jpeg_quality), "max_side": max_side, "raw_max_pixels": RAW_MAX_PIXELS}
    key = hashlib.sha1(repr((source.name, source.split, source.paths[:1], len(source))).encode()).hexdigest()
    path = cache_root(cache_dir) / "ffcv" / f"{key}.beton"
    stamp_file = path.with_suffix(".stamp")
    stamp = _stamp(source, options)
    try:
        if path.is_file() and stamp_file.read_text() == stamp:
            return path
    except OSError:
        pass
    try:
        write_beton(source, path, jpeg_quality=jpeg_quality, max_side=max_side)
        stamp_file.write_text(stamp)
    except DataError as e:
        raise PipelineError(str(e)) from None
    return path


# ---------------------------------------------------------------- command line
def main(argv=None) -> int:
    from .data import open_source

    p = argparse.ArgumentParser(prog="python -m pipelines.ffcv", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a source as a .beton")
    w.add_argument("--data", default=None, help="ImageFolder, .txt file list, tar shards, fashion-mnist, or the sample")
    w.add_argument("--split", default="train", choices=["train", "test"])
    w.add_argument("--recheck-data", action="store_true", help="as train.py's: stat every file of a --data folder")
    w.add_argument("--out", required=True, help="the .beton to write (atomically)")
    w.add_argument("--jpeg-quality", type=int, default=DEFAULT_QUALITY,
                   help="quality of images that must be re-encoded (kept JPEGs keep their bytes)")
    w.add_argument("--max-side", type=int, default=None, help="shrink images whose longer side exceeds this")
    args = p.parse_args(argv)
    try:
        source = open_source(args.data, args.split, recheck=args.recheck_data)
        if source is None:
            raise DataError(f"{args.data}: has no {args.split} split")
        counts = write_beton(source, args.out, jpeg_quality=args.jpeg_quality, max_side=args.max_side)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {counts['written']} images; skipped {counts['skipped_index']} unreadable "
          f"(index) and {counts['skipped_write']} that failed to decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
