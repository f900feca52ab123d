# syntax=docker/dockerfile:1
# The project image: every pipeline step, the training PyTorchJobs and `cellseg predict`.
# Build from the repository root: docker build -f images/gpu.Dockerfile -t IMAGE .  (make images)
#
# Base: the official PyTorch CUDA 13 runtime, pinned by version and digest. It provides Python,
# the CUDA user-space libraries and cuDNN; requirements.lock then installs the project's own
# pinned torch 2.14.1 (cu13 wheels) and everything else, nothing unpinned.
FROM pytorch/pytorch:2.10.0-cuda13.0-cudnn9-runtime@sha256:1f57418aedd9a4d0d3a59646619e1d4f82cacc33817247cead4f749e1f452d4b AS base

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1

# --- the project wheel, built apart so the final image carries no source tree ----------------
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime ------------------------------------------------------------------------------------
FROM base
COPY requirements.lock /tmp/requirements.lock
RUN python -m pip install --no-cache-dir -r /tmp/requirements.lock && rm /tmp/requirements.lock
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
