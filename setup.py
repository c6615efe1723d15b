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
    "matplotlib>=3.8",  # bench/show.py: a run's curves.png
]
EXTRAS = {
    "dali": ["nvidia-dali-cuda130>=2.4,<3"],
    # needs `apt-get install pkg-config libturbojpeg0-dev libopencv-dev` first (its C extension);
    # ffcv brings opencv-python itself (a second, headless OpenCV would fight it over cv2)
    "ffcv": ["ffcv>=1.0.2"],
    "dev": ["pytest>=8", "hypothesis>=6.100", "tensorboard>=2.15"],
}
EXTRAS["all"] = sorted({r for reqs in EXTRAS.values() for r in reqs})
# The exact versions checked on the project's machines (2 cores, Python 3.11).
EXTRAS["pinned"] = ["torch==2.14.1", "torchvision==0.29.1", "numba==0.68.1", "nvidia-dali-cuda130==2.4.0"]

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
