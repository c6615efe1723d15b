# The README's environment on a CUDA base: the same package set, GPU-ready.
#   docker build -t viewforge .
#   docker run --gpus all --ipc=host -v /data:/data viewforge \
#       torchrun --standalone --nproc_per_node=8 train.py --pipeline dali --method mocov2 --data /data/imagenet
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 VIEWFORGE_CACHE=/cache THP_MEM_ALLOC_ENABLE=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-dev git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /workspace/viewforge
# Dependencies first, so code edits do not rebuild them.
COPY setup.py ./
RUN mkdir -p pipelines model/methods && touch pipelines/__init__.py model/__init__.py model/methods/__init__.py \
    && python3 -m pip install --no-cache-dir -e ".[dali,dev]" && rm -rf pipelines model
COPY . .
RUN python3 -m pip install --no-cache-dir --no-deps -e . && python3 -c "import pipelines, model.methods"
VOLUME ["/cache", "/workspace/viewforge/runs"]
CMD ["python3", "train.py", "--pipeline", "dali", "--method", "mocov2"]
