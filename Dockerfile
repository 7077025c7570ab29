# syntax=docker/dockerfile:1.7
# One image for the API, the migration job and GPU workers.
# On a Linux x86-64 builder, torch from the package index is the CUDA build, which
# runs on GPU nodes and falls back to the CPU elsewhere.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends tini curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, so a code change does not reinstall torch.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY service/__init__.py service/__init__.py
COPY trainer/__init__.py trainer/__init__.py
RUN pip install ".[demo]" && pip uninstall -y tuneforge

COPY service service
COPY trainer trainer
COPY migrations migrations
COPY examples examples
RUN pip install --no-deps -e .

RUN useradd --create-home --uid 1000 tuneforge \
    && mkdir -p /data /var/lib/tuneforge \
    && chown tuneforge /var/lib/tuneforge
USER tuneforge

ENV TUNEFORGE_HOME=/var/lib/tuneforge \
    TUNEFORGE_ARTIFACT_DIR=/var/lib/tuneforge/artifacts \
    TUNEFORGE_DATA_ROOTS=/data

EXPOSE 8000
ENTRYPOINT ["tini", "--"]
CMD ["tuneforge", "serve", "--host", "0.0.0.0", "--port", "8000"]

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
