"""A process's own memory, read from /proc: its RSS, its RSS high-water
mark, and lowering that mark to the RSS now, so that the mark after a call
is the call's (bench/clim_search.py, bench/scale.py's points)."""
from __future__ import annotations

import resource


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def max_rss_bytes() -> int:
    """This process's RSS high-water mark: VmHWM, its own memory's. Not
    getrusage's ru_maxrss: after an exec that also holds the mark of the
    process it replaced, here the parent that started it (vfork)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_max_rss() -> None:
    """Lower the high-water mark to the RSS now (Linux's clear_refs 5): the
    imports and warm-ups before a call often leave it above what they keep.
    Where that is refused the mark stays, and a call below it is not `clean`."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
