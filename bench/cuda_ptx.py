"""Compile pipelines/colour.py's CUDA kernels without a GPU, with what pip
installed (numba-cuda, its NVVM, nvJitLink), and count their PTX
instructions per output pixel.

    python bench/cuda_ptx.py                    # every kernel, float32 + float16 out, sm_90 + sm_80
    python bench/cuda_ptx.py --arch 9.0 --dtype float32 --kernels pixel
    python bench/cuda_ptx.py --measure --arch 9.0   # the per-pixel count too (minutes: the simulator)

Each kernel is compiled to PTX by NVVM for each architecture and output
dtype, with the argument types its launch passes on a GPU (recorded from
the same launches run in Numba's CUDA simulator, in a child process), then
linked into a cubin by the installed nvJitLink. Exit status 1 when a kernel
does not compile or link, or when a float product was fused into an add
(the kernels must round like the CPU operator and Pillow).

--measure, PTX instructions per output pixel, the CPU-side measure of
kernel cost. A child process runs one representative view through the
simulator with the launch settings a GPU gets: 224 x 224, colour jitter
with all four operations (brightness 0.8, contrast 1.3, saturation 0.6,
hue 0.1, in that order), grayscale, blur k=23 (sigma 1.5), solarize,
float32 out. It counts how often each source statement of
pipelines/colour.py runs, over all threads; a loop header's runs are split
into entries and returns from its body. The kernels those launches use are
compiled again for the first --arch with line information and loop
unrolling off (so that a statement's code appears once), and each PTX
instruction is charged to the statement its .loc names (line 0: the
statement before it). A loop header's instructions inside the PTX loop
that holds its body run per iteration, the others (trip count, guard) per
entry; a basic block identical to an earlier one (registers aside) is a
compiler copy (an unswitched or peeled loop) that runs instead of the
other, and counts once. The measure: the sum over statements of (PTX
instructions) x (runs), divided by the view's pixels. An estimate from
PTX, not a profile: NVVM inlines device functions at their call, so a
device function counts whole, once per call (all its branches, its loops
once: hue's six sectors, all four jitter operations); code hoisted out of
a loop still counts per iteration; ptxas schedules and expands PTX
further. 64-bit integer divisions and remainders (div/rem .s64/.u64) count
as one instruction each and are also reported apart: each becomes a long
sequence (or a call) on the GPU. Numba's range() with a runtime step
divides to get its trip count, once per loop entry.
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import re
import subprocess
import sys
import threading
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KERNEL, SIGMA = 23, 1.5


# ---------------------------------------------------------------- the simulator side (child process)
def _child_main(measure: bool, view: int) -> None:
    """Under NUMBA_ENABLE_CUDASIM=1: run the launches; print JSON with each
    launch's kernel and argument types and (measure) how often each
    statement of pipelines/colour.py ran."""
    import numpy as np
    import torch

    from pipelines import colour

    launches = []
    real = colour._launch
    names = {id(k): name for name, k in colour._cuda_kernels().items()}

    def recording(kernel, grid, threads, args, device, shared=0):
        launches.append({"kernel": names[id(kernel)], "args": [_arg_type(a) for a in args]})
        return real(kernel, grid, threads, args, device, shared)

    colour._launch = recording
    runs = {}
    if measure:
        rng = np.random.default_rng(0)
        tiles = torch.from_numpy(rng.integers(0, 256, (1, view, view, 3), dtype=np.uint8))
        out = torch.empty(tiles.shape, dtype=torch.float32)
        runs = _count_statements(colour.__file__, lambda: colour.render_views(tiles, _view_params(colour, np), out))
    measured = list(launches)
    for dtype in (torch.float32, torch.float16):  # every kernel and output dtype, tiny
        p = np.repeat(_view_params(colour, np), 4, axis=0)
        p[:, colour.PARAM_KERNEL] = 3
        out = torch.empty((4, 4, 4, 3), dtype=dtype)
        for shared in (colour.SHARED_BYTES, 0):  # the tiled blur, then the fallback's two passes
            colour.render_views(torch.zeros((4, 4, 4, 3), dtype=torch.uint8), p, out, threads=4, shared=shared)
        mosaic = types.SimpleNamespace(tile_crop=np.zeros((1, 4), np.int32), tile_src=np.zeros((1, 4), np.int32),
                                       paste=np.zeros((1, 4, 6), np.int32))
        colour.paste_mosaics(out.view(4, 1, 4, 4, 3), mosaic, colour.mosaic_fill("cpu", dtype),
                             torch.empty((1, 8, 8, 3), dtype=dtype), threads=4)
    print(json.dumps({"launches": launches, "measured": measured, "runs": runs, "pixels": view * view}))


def _arg_type(arg) -> list:
    """A launch argument as [numba type name, ndim, layout] (what the GPU
    launch passes: a tensor's device array is 'C' when contiguous; a Python
    int is int64, a bool boolean, a tuple of float32 a UniTuple)."""
    import torch
    if isinstance(arg, torch.Tensor):
        return [str(arg.dtype).replace("torch.", ""), arg.dim(), "C" if arg.is_contiguous() else "A"]
    if isinstance(arg, tuple):
        return [type(arg[0]).__name__, len(arg), "tuple"]
    return ["boolean" if isinstance(arg, bool) else "int64", 0, "scalar"]


def _view_params(colour, np):
    """The representative view's parameter vector [1, PARAM_LEN]."""
    p = np.zeros((1, colour.PARAM_LEN), np.float32)
    p[0, colour.PARAM_JITTER] = 1
    p[0, colour.PARAM_ORDER:colour.PARAM_ORDER + 4] = (0, 1, 2, 3)
    p[0, colour.PARAM_BRIGHTNESS:colour.PARAM_HUE] = (0.8, 1.3, 0.6)
    p[0, colour.PARAM_HUE] = 25  # hue 0.1: int32(0.1 * 255) & 255
    p[0, colour.PARAM_GRAY] = 1
    p[0, colour.PARAM_SIGMA] = SIGMA
    p[0, colour.PARAM_KERNEL] = KERNEL
    p[0, colour.PARAM_SOLARIZE] = 1
    return p


def _count_statements(path: str, run) -> dict:
    """{statement line: runs} of the file's statements over every simulated
    thread while run() runs (one run per execution of a statement, however
    many of its lines Python reports); a loop header's runs are split into
    'LINE:e' (entering the loop) and 'LINE:i' (coming back from its body)."""
    source = Path(path).read_text()
    unit, loops = statement_units(source), loop_bodies(source)
    counters, mine = [], threading.local()
    lock = threading.Lock()

    def tracer(frame, event, arg):
        if event != "call" or frame.f_code.co_filename != path:
            return None
        counter = getattr(mine, "counter", None)
        if counter is None:
            counter = mine.counter = collections.Counter()
            with lock:
                counters.append(counter)
        last = [None]

        def local(frame, event, arg):
            if event == "line":
                u = unit.get(frame.f_lineno)
                if u is not None and u != last[0]:
                    if u in loops:
                        back = last[0] is not None and u < last[0] <= loops[u][0]
                        counter[f"{u}:{'i' if back else 'e'}"] += 1
                    else:
                        counter[str(u)] += 1
                last[0] = u
            return local
        return local

    threading.settrace(tracer)
    sys.settrace(tracer)
    try:
        run()
    finally:
        sys.settrace(None)
        threading.settrace(None)
    total = collections.Counter()
    for counter in counters:
        total.update(counter)
    return dict(total)


def statement_units(source: str) -> dict:
    """line -> the first line of the innermost statement holding it (of a
    compound statement, its header: a `for`/`if`/`while` up to its body)."""
    unit = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.stmt) or isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        compound = isinstance(node, (ast.For, ast.While, ast.If, ast.With)) and node.body
        last = node.body[0].lineno - 1 if compound else node.end_lineno
        for line in range(node.lineno, max(last, node.lineno) + 1):
            unit[line] = max(unit.get(line, 0), node.lineno)
    return unit


def loop_bodies(source: str) -> dict:
    """A `for`/`while` header's line -> (the last line of its loop, how many
    loops enclose it)."""
    out = {}

    def walk(node, depth):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.For, ast.While)):
                out[child.lineno] = (child.end_lineno, depth)
                walk(child, depth + 1)
            elif isinstance(child, (ast.FunctionDef, ast.Lambda)):
                walk(child, 0)
            else:
                walk(child, depth)
    walk(ast.parse(source), 0)
    return out


# ---------------------------------------------------------------- the compiler side
DIVREM = re.compile(r"^(@!?%\w+\s+)?(div|rem)\.(s64|u64)\s")
INSTRUCTION = re.compile(r"^(@!?%\w+\s+)?[a-z]")
BRANCH = re.compile(r"^(@!?%\w+\s+)?bra(\.uni)?\s+(\$\w+);")


def ptx_blocks(ptx: str, unit: dict) -> list:
    """The basic blocks of a kernel's PTX: [(instructions, successors)], an
    instruction being (statement line, is a 64-bit div/rem, its text with
    registers and labels blanked), its line from .loc (line 0: the line
    before it)."""
    blocks, labels, ends = [[]], {}, []   # ends[i]: (branch target or None, falls through)
    line = 0
    for text in ptx.splitlines():
        s = text.strip()
        if s.startswith(".loc"):
            line = int(s.split()[2]) or line
            continue
        if re.match(r"^\$\w+:$", s):
            if blocks[-1]:
                ends.append((None, True))
                blocks.append([])
            labels[s[:-1]] = len(blocks) - 1
            continue
        if not s.endswith(";") or not INSTRUCTION.match(s):
            continue
        blocks[-1].append((unit.get(line, line), bool(DIVREM.match(s)), re.sub(r"%\w+|\$\w+", "%", s)))
        branch = BRANCH.match(s)
        if branch or re.match(r"^(ret|exit);", s):
            ends.append((branch.group(3) if branch else None, bool(branch and branch.group(1))))
            blocks.append([])
    ends.append((None, False))
    return [(body, [labels[t] for t in [target] if t] + ([i + 1] if falls and i + 1 < len(blocks) else []))
            for i, (body, (target, falls)) in enumerate(zip(blocks, ends))]


def natural_loops(blocks: list) -> list:
    """Each loop of the CFG as the set of its blocks (back edges found by a
    depth-first walk from the entry; one loop per header)."""
    succ = [s for _, s in blocks]
    pred = collections.defaultdict(list)
    for u, ss in enumerate(succ):
        for v in ss:
            pred[v].append(u)
    loops, on_stack, seen = collections.defaultdict(set), set(), set()
    stack = [(0, iter(succ[0]))]
    seen.add(0)
    on_stack.add(0)
    while stack:
        u, it = stack[-1]
        v = next(it, None)
        if v is None:
            on_stack.discard(u)
            stack.pop()
        elif v in on_stack:  # a back edge u -> v: v's loop holds every block reaching u without passing v
            body, todo = {v, u}, [u] if u != v else []
            while todo:
                x = todo.pop()
                for y in pred[x]:
                    if y not in body:
                        body.add(y)
                        todo.append(y)
            loops[v] |= body
        elif v not in seen:
            seen.add(v)
            on_stack.add(v)
            stack.append((v, iter(succ[v])))
    return list(loops.values())


def ptx_by_statement(ptx: str, unit: dict, loops: dict) -> dict:
    """{statement: (instructions, 64-bit div/rem)} of a kernel's PTX; a loop
    header's instructions are split into 'LINE:i', those in blocks nested
    in more PTX loops than the header is in source loops (inside its own
    loop), and 'LINE:e', the rest (once per entry: trip count, guard). A block identical to
    an earlier one (registers and labels aside) counts once: the compiler's
    copies of a loop (unswitched on a flag, peeled) run instead of each
    other, not both."""
    blocks = ptx_blocks(ptx, unit)
    depth = collections.Counter(b for lp in natural_loops(blocks) for b in lp)
    per = collections.defaultdict(lambda: [0, 0])
    copies = set()
    for b, (body, _) in enumerate(blocks):
        keys = [f"{u}:{'i' if depth[b] > loops[u][1] else 'e'}" if u in loops else str(u) for u, _, _ in body]
        copy = tuple(zip(keys, body))
        if copy in copies:  # a copy the compiler made (unswitched, peeled loops): it runs instead of the other
            continue
        copies.add(copy)
        for key, (_, divrem, _) in zip(keys, body):
            per[key][0] += 1
            per[key][1] += divrem
    return {k: tuple(v) for k, v in per.items()}


def no_device(cc) -> None:
    """Device functions ask the current device for its compute capability;
    without a GPU, answer for the architecture being compiled."""
    import numba.cuda.api as api
    import numba.cuda.dispatcher as dispatcher
    fake = lambda: types.SimpleNamespace(compute_capability=cc)  # noqa: E731
    api.get_current_device = dispatcher.get_current_device = fake


def rolled_loops():
    """Make NVVM keep every loop rolled for the measure: unroll.disable
    metadata on each branch of the IR. Returns a function that undoes it."""
    import numba.cuda.cudadrv.nvvm as nvvm
    real = nvvm.compile_ir

    def compile_ir(llvmir, **options):
        mods = [llvmir] if isinstance(llvmir, str) else list(llvmir)
        return real([_rolled(m) for m in mods], **options)

    def undo():
        nvvm.compile_ir = real
    nvvm.compile_ir = compile_ir
    return undo


def _rolled(ir: str) -> str:
    out = [line + ", !llvm.loop !90001" if re.match(r"^\s+br (i1 |label )", line) and "!llvm.loop" not in line
           else line for line in ir.splitlines()]
    out += ["!90001 = distinct !{!90001, !90002}", '!90002 = !{!"llvm.loop.unroll.disable"}']
    return "\n".join(out) + "\n"


def link(ptx: str, cc, name: str) -> int:
    """nvJitLink: PTX -> cubin for sm_XY; the cubin's size (raises on failure)."""
    from cuda.bindings import nvjitlink
    data = ptx.encode()
    handle = nvjitlink.create(1, [f"-arch=sm_{cc[0]}{cc[1]}".encode()])
    try:
        try:
            nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), name)
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as e:
            log = bytearray(nvjitlink.get_error_log_size(handle))
            nvjitlink.get_error_log(handle, log)
            raise RuntimeError(f"nvJitLink: {e}: {log.decode(errors='replace').strip(chr(0)).strip()}") from None
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
        return len(cubin)
    finally:
        nvjitlink.destroy(handle)


def versions() -> str:
    """What compiles and links, and where each library was found (a pip
    wheel's folder: site-packages; a system CUDA: CUDA_HOME or /usr/local/cuda)."""
    from importlib import metadata

    from cuda.bindings import nvjitlink
    from cuda.pathfinder import load_nvidia_dynamic_lib
    from numba.cuda.cuda_paths import get_cuda_paths

    def dist(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not from pip"
    nvvm = get_cuda_paths()["nvvm"]
    linker = load_nvidia_dynamic_lib("nvJitLink")
    return (f"numba-cuda {dist('numba-cuda')}; NVVM: nvidia-nvvm {dist('nvidia-nvvm')}, {nvvm.info} (found via "
            f"{nvvm.by}); nvJitLink {'.'.join(map(str, nvjitlink.version()))}: nvidia-nvjitlink "
            f"{dist('nvidia-nvjitlink')}, {linker.abs_path} (found via {linker.found_via})")


def run_child(measure: bool, view: int) -> dict:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    cmd = [sys.executable, __file__, "--child", "--view", str(view)] + (["--measure"] if measure else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
    if done.returncode:
        raise RuntimeError(f"the simulator run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="9.0,8.0", help="compute capabilities, comma-separated (H100/H200: 9.0)")
    p.add_argument("--dtype", default="float32,float16", help="output dtypes, comma-separated")
    p.add_argument("--kernels", default="pixel,blur,blur_pass,paste",
                   help="kernels, comma-separated (pipelines/colour.py's _cuda_kernels names)")
    p.add_argument("--measure", action="store_true", help="also count PTX instructions per output pixel")
    p.add_argument("--view", type=int, default=224, help="the representative view's size for --measure")
    p.add_argument("--statements", action="store_true", help="with --measure: the count of every statement")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child_main(a.measure, a.view)
        return 0
    from numba import config
    if config.ENABLE_CUDASIM:
        print("cuda_ptx: NUMBA_ENABLE_CUDASIM is set; the simulator compiles nothing", file=sys.stderr)
        return 2
    info = run_child(a.measure, a.view)
    from numba import cuda
    from numba import types as T

    from pipelines import colour
    archs = [tuple(int(x) for x in s.split(".")) for s in a.arch.split(",")]
    dtypes, wanted = a.dtype.split(","), a.kernels.split(",")
    kernels = colour._cuda_kernels()
    print(versions())

    def signature(args):
        return tuple(T.UniTuple(getattr(T, dt), nd) if layout == "tuple" else getattr(T, dt) if layout == "scalar"
                     else T.Array(getattr(T, dt), nd, layout) for dt, nd, layout in args)

    failed, done = 0, set()
    for launch in info["launches"]:
        name = launch["kernel"]
        out = "float16" if any(a == ["float16", 4, "C"] for a in launch["args"]) else "float32"
        if (name, out) in done or name not in wanted or out not in dtypes:
            continue
        done.add((name, out))
        for cc in archs:
            no_device(cc)
            where = f"{name} -> {out}, sm_{cc[0]}{cc[1]}"
            try:
                ptx, _ = cuda.compile_ptx(kernels[name].py_func, signature(launch["args"]), cc=cc)
                fused = len(re.findall(r"\bfma\.rn\.f(?:32|64)\b", ptx))
                size = link(ptx, cc, name)
                version = re.search(r"^\.version (\S+)", ptx, re.M).group(1)
                print(f"{where}: PTX {version}, {len(ptx)} chars, {fused} fused multiply-adds; linked: cubin "
                      f"{size} bytes")
                failed |= bool(fused)
            except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                print(f"{where}: FAILED: {e}")
                failed = 1
    if not done:
        print("cuda_ptx: no kernel matched --kernels/--dtype", file=sys.stderr)
        return 2
    if a.measure:
        measure(info, kernels, signature, archs[0], a.view, a.statements)
    return 1 if failed else 0


def measure(info, kernels, signature, cc, view: int, statements: bool) -> None:
    from numba import cuda

    from pipelines import colour
    source = Path(colour.__file__).read_text()
    unit, loops = statement_units(source), loop_bodies(source)
    runs = collections.Counter(info["runs"])
    no_device(cc)
    undo = rolled_loops()
    total = divrem = 0
    try:
        for name in dict.fromkeys(launch["kernel"] for launch in info["measured"]):
            args = next(launch["args"] for launch in info["measured"] if launch["kernel"] == name)
            ptx, _ = cuda.compile_ptx(kernels[name].py_func, signature(args), cc=cc, lineinfo=True)
            per = ptx_by_statement(ptx, unit, loops)
            for key in sorted(per, key=lambda k: (int(k.split(":")[0]), k)):
                n, d = per[key]
                total, divrem = total + n * runs[key], divrem + d * runs[key]
                if statements:
                    print(f"  {name} line {key}: {n} instructions ({d} 64-bit div/rem) x {runs[key]} runs")
    finally:
        undo()
    px = info["pixels"]
    print(f"PTX instructions per output pixel (sm_{cc[0]}{cc[1]}; one {view} x {view} view, every jitter "
          f"operation, grayscale, blur k={KERNEL}, solarize, float32 out): {total / px:.0f}, of them 64-bit "
          f"div/rem: {divrem / px:.1f}")


if __name__ == "__main__":
    sys.exit(main())
