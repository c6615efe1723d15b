"""viewforge: self-supervised pre-training whose views are made fast (DALI on the GPU)."""
from setuptools import setup

# Pins known to work on the project's CPU machines; ranges let a GPU machine
# with a newer torch install it.
CORE = [
    "torch>=2.4",
    "torchvision>=0.19",
    "numba>=0.60",
    "numpy>=1.24",
    "pillow>=10",
    "pyyaml>=6",
    "tqdm>=4.60",
    "matplotlib>=3.8",  # model/curves.py: a run's curves.png
]
# numba-cuda compiles pipelines/colour.py's CUDA kernels (DALI's GPU graph, FFCV's colour on a GPU); its cu13
# extra brings NVVM (nvidia-nvvm) and nvJitLink as wheels, matched to torch's CUDA toolkit, so no system CUDA is
# needed (numba's own numba.cuda finds NVVM only through conda, CUDA_HOME or /usr/local/cuda).
CUDA_KERNELS = ["numba-cuda[cu13]>=0.30,<1"]
EXTRAS = {
    "dali": ["nvidia-dali-cuda130>=2.4,<3"] + CUDA_KERNELS,
    # needs `apt-get install pkg-config libturbojpeg0-dev libopencv-dev` first (its C extension);
    # ffcv brings opencv-python itself (a second, headless OpenCV would fight it over cv2)
    "ffcv": ["ffcv>=1.0.2"] + CUDA_KERNELS,
    "dev": ["pytest>=8", "hypothesis>=6.100", "tensorboard>=2.15"],
}
EXTRAS["all"] = sorted({r for reqs in EXTRAS.values() for r in reqs})
# The exact versions checked on the project's machines (2 cores, Python 3.11). NVVM and nvJitLink at torch's
# CUDA (cuda-toolkit 13.0.3): NVVM writes PTX of its own CUDA version, which an older nvJitLink refuses.
EXTRAS["pinned"] = ["torch==2.14.1", "torchvision==0.29.1", "numba==0.68.1", "nvidia-dali-cuda130==2.4.0",
                    "numba-cuda[cu13]==0.30.4", "nvidia-nvvm==13.0.88", "nvidia-nvjitlink==13.0.88"]

setup(
    name="viewforge",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=["pipelines", "model", "model.methods", "bench", "configs"],
    package_data={"pipelines": ["sample/*.npz", "sample/README.md"]},
    py_modules=["train"],
    install_requires=CORE,
    extras_require=EXTRAS,
)
