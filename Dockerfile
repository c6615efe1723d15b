# The README's environment in a container, for users (CUDA) and for the CPU.
#
# CUDA image (a machine with internet and Docker or podman):
#   docker build -t viewforge .
#   docker run --gpus all --ipc=host -v /data:/data -v $PWD/runs:/workspace/viewforge/runs viewforge \
#       --pipeline dali --method mocov2 --data /data/imagenet
# The entry point runs `torchrun ... train.py ARGS` (cluster/entrypoint.sh): one
# process per GPU on one node, or NNODES / RDZV_ENDPOINT for several nodes.
#
# CPU image: any Debian or Ubuntu base with python3-venv, the same wheels
# (they run on the CPU). cluster/test/build-image.sh builds it on machines
# without a registry, from a local Debian base and the host's pip settings:
#   podman build --build-arg BASE_IMAGE=localhost/debian-local:bookworm -t viewforge:cpu .
ARG CUDA_VERSION=13.0.0
ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# torch and torchvision as the README pins them; the other pins come from
# setup.py's `pinned` extra when these are its versions (see below).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# The DALI wheel for the base's CUDA major version (cuda120, cuda130), and
# numba-cuda with the extra that brings NVVM and nvJitLink as wheels for it
# (cu12, cu13): the runtime base has no nvvm/, and the colour kernels are
# compiled at the first GPU step.
ARG DALI_PACKAGE=nvidia-dali-cuda130
ARG NUMBA_CUDA_PACKAGE=numba-cuda[cu13]
# A pip configuration to use while building (the CPU build points it at the
# host's settings, mounted for the build only; a missing file is ignored).
ARG PIP_CONFIG_FILE=/nonexistent

# NVIDIA_DRIVER_CAPABILITIES: `video` makes the container toolkit mount the
# driver's video libraries, which nvJPEG's hardware decoder (A100, H100) needs.
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIEWFORGE_CACHE=/cache THP_MEM_ALLOC_ENABLE=1 PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,video
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 viewforge
WORKDIR /workspace/viewforge

# Dependencies first, so code edits do not reinstall them.
COPY setup.py ./
RUN mkdir -p pipelines model/methods bench configs \
    && touch pipelines/__init__.py model/__init__.py model/methods/__init__.py bench/__init__.py configs/__init__.py \
    && extras="dev" \
    && if [ "$TORCH_VERSION" = 2.14.1 ] && [ "$TORCHVISION_VERSION" = 0.29.1 ]; then extras="$extras,pinned"; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
       "${DALI_PACKAGE}>=2.4,<3" "${NUMBA_CUDA_PACKAGE}>=0.30,<1" -e ".[${extras}]" \
    && rm -rf pipelines model bench configs *.egg-info
COPY --chown=viewforge:viewforge . .
RUN pip install --no-cache-dir --no-deps -e . && python3 -c "import torch, pipelines, model.methods" \
    && mkdir -p runs /cache && chown viewforge:viewforge runs /cache
USER viewforge
VOLUME ["/cache", "/workspace/viewforge/runs"]
ENTRYPOINT ["/workspace/viewforge/cluster/entrypoint.sh"]
CMD ["--pipeline", "dali", "--method", "mocov2"]
