# syntax=docker/dockerfile:1
# The project image: every pipeline step, the training jobs and `cellseg predict`.
# Build from the repository root with `make images` (docker, podman or buildah).
#
# Base: by default the official PyTorch CUDA 13 runtime, pinned by version and digest (Python,
# the CUDA user-space libraries, cuDNN). Where no registry is reachable, any Debian-like base with
# Python 3.11 works: `make base-image && make images BASE_IMAGE=localhost/debian-python:3.11`.
# requirements.lock installs the project's pinned torch 2.14.1 (cu13 wheels) and everything
# else into /opt/venv, nothing unpinned.
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda13.0-cudnn9-runtime@sha256:1f57418aedd9a4d0d3a59646619e1d4f82cacc33817247cead4f749e1f452d4b
FROM ${BASE_IMAGE} AS base

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# A venv: Debian's Python is externally managed (PEP 668), and on the PyTorch base it keeps the
# project's pins apart from the base's own packages.
RUN python3 -m venv /opt/venv

# A CA bundle for pip behind a TLS-intercepting proxy comes in as the build secret `pip_ca`
# (make images passes it when one is configured): mounted for that RUN only, never in a layer.

# --- the project wheel, built apart so the final image carries no source tree ----------------
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime ------------------------------------------------------------------------------------
FROM base
COPY requirements.lock /tmp/requirements.lock
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python -m pip install --no-cache-dir -r /tmp/requirements.lock && rm /tmp/requirements.lock
COPY --from=wheel /wheels /tmp/wheels
RUN python -m pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels

# Non-root; the Hugging Face cache (UNI weights) lives on a volume, never in the image.
# Secrets (HF_TOKEN, S3 keys) come from Kubernetes Secrets at run time.
RUN groupadd --gid 1000 cellseg \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin cellseg \
    && mkdir -p /cache/huggingface \
    && chown -R 1000:1000 /cache/huggingface
VOLUME ["/cache/huggingface"]
USER 1000:1000
WORKDIR /home/cellseg
CMD ["cellseg", "--help"]
