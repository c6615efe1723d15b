"""Compile pipelines/colour.py's CUDA kernels to PTX without a GPU, and check
that no float product was fused into an add (the kernels must round like
the CPU operator and Pillow).

Needs numba-cuda and NVVM, e.g. in a private folder (nothing else changes):

    pip install --target /tmp/nc numba-cuda 'cuda-bindings>=13,<14' cuda-core cuda-pathfinder 'nvidia-nvvm>=13,<14' \\
        nvidia-cuda-runtime nvidia-cuda-nvrtc nvidia-nvjitlink
    python bench/cuda_ptx.py --site /tmp/nc [--cc 9.0]
"""
import argparse
import site
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--site", help="folder numba-cuda was installed into (added as a site directory)")
    p.add_argument("--cc", default="9.0", help="compute capability to compile for (H100/H200: 9.0)")
    a = p.parse_args()
    if a.site:
        site.addsitedir(a.site)
    from numba import cuda
    from numba import types as T
    cc = tuple(int(x) for x in a.cc.split("."))
    # device functions ask the current device for its compute capability; there is none here
    import numba.cuda.api as api
    import numba.cuda.dispatcher as dispatcher
    fake = lambda: types.SimpleNamespace(compute_capability=cc)  # noqa: E731
    api.get_current_device = dispatcher.get_current_device = fake

    from pipelines import colour
    render, paste = colour._cuda_kernels()
    arr = lambda dtype, ndim: T.Array(dtype, ndim, "A")  # noqa: E731
    fused = 0
    for out in (T.float32, T.float16):
        ptx, _ = cuda.compile_ptx(render.py_func, (arr(T.uint8, 4), arr(T.float32, 2), arr(T.float32, 2),
                                                   arr(T.float32, 3), arr(out, 4), arr(T.float32, 1),
                                                   arr(T.float32, 1)), cc=cc)
        n_fma = ptx.count("fma.rn.f32") + ptx.count("fma.rn.f64")
        fused += n_fma
        print(f"render -> {out}: {len(ptx)} chars of PTX for sm_{cc[0]}{cc[1]}, {ptx.count('mul.rn.f32')} mul.rn.f32,"
              f" {ptx.count('add.rn.f32')} add.rn.f32, {n_fma} fused multiply-adds")
        ptx, _ = cuda.compile_ptx(paste.py_func, (arr(out, 5), arr(T.int32, 2), arr(T.int32, 2), arr(T.int32, 3),
                                                  arr(out, 1), arr(out, 4)), cc=cc)
        print(f"paste -> {out}: {len(ptx)} chars of PTX")
    return 1 if fused else 0


if __name__ == "__main__":
    sys.exit(main())
