# lipflow on NVIDIA GPUs: the same pinned environment as make setup, with the CUDA build of torch.
#
#   docker build -t lipflow .
#   docker run --gpus all --shm-size 16g -v /data:/data lipflow train --config configs/celebahq-256.yaml
#
# Several ranks and nodes (launch/*.sh as the entry point), apptainer, enroot/pyxis, SLURM: docs/cluster.md
#
# Base: CUDA 12.8 devel (nvcc present), so DeepSpeed ops are JIT-compiled on first use rather than
# prebuilt (DS_BUILD_OPS=0). lipflow uses a plain torch optimizer, so on GPU no op is built at all.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's python3.11 tracks security updates; pinning its exact patch release would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev git ca-certificates libaio-dev openssh-client \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /opt/lipflow
# Dependencies first (a cached layer): requirements.lock pins every package. Its torch line names the
# CPU build (+cpu); here PyPI's default torch 2.13.0, the CUDA build, is installed instead.
COPY requirements.lock ./
RUN grep -v '^torch==' requirements.lock > /tmp/requirements.txt \
    && pip install torch==2.13.0 \
    && pip install -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY configs ./configs
COPY launch ./launch
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 lipflow \
    && mkdir -p /runs /data && chown lipflow:lipflow /runs /data

USER 1000:1000
ENV HOME=/home/lipflow
WORKDIR /opt/lipflow
ENTRYPOINT ["python", "-m", "pipeline"]
CMD ["--help"]
