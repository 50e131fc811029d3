# kd_ray on GPU machines: CUDA PyTorch, Ray and this checkout, installed (editable) in /opt/kd_ray.
#
#   docker build -t kd_ray:0.1.0 .
#   docker run --rm -it --gpus all --shm-size=16g kd_ray:0.1.0 kd-ray demo --set run.use_gpu=true
#
# --gpus all needs the NVIDIA Container Toolkit on the host. --shm-size: Ray keeps its object store
# in /dev/shm, and Docker's 64 MB default starves it (Ray warns and falls back to slow disk).
# The cluster launcher (cluster.yaml) runs this image on every node and sizes /dev/shm itself.
# The versions below stay inside pyproject.toml's ranges (tests/test_cluster.py checks them).
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG RAY_VERSION=2.60.0
# PyTorch wheels that bundle the CUDA 13.0 runtime; the host only needs the NVIDIA driver.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

# rsync: the cluster launcher syncs file_mounts into the container with it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends rsync openssh-client procps \
    && rm -rf /var/lib/apt/lists/*

RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} \
        torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION}
RUN pip install --no-cache-dir "ray[train,tune,default]==${RAY_VERSION}"

# Editable, so `kd-ray demo` finds configs/ and `kd-ray submit` uploads this folder.
WORKDIR /opt/kd_ray
COPY . /opt/kd_ray
RUN pip install --no-cache-dir -e .

# Token auth: cluster.yaml sets RAY_AUTH_MODE=token and ships the token; single-machine kd-ray
# commands start their own local Ray without it.
CMD ["kd-ray", "--help"]
