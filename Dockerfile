# The snac-dit server on one NVIDIA GPU. Deploy with `docker compose up` (docs/server.md).
# Install steps are the Makefile's: torch first (here its CUDA build), then this package.
# Build args (defaults = the GPU image): BASE_IMAGE, TORCH_SPEC, TORCH_INDEX_URL (empty = PyPI).
# `make docker-test` builds a CPU image from a local Debian base with them (DEVELOPERS.md).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# gcc + python3-dev: Triton compiles its small C launcher on first kernel use, at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
        ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# Certificates in docker/certs/*.crt (untracked; e.g. a TLS-inspecting proxy's CA) are trusted by
# pip at build time and by Python's HTTP clients at run time, on top of the system store.
COPY docker/certs /tmp/certs
RUN cat /etc/ssl/certs/ca-certificates.crt $(ls /tmp/certs/*.crt 2>/dev/null) > /opt/ca-bundle.crt \
    && rm -rf /tmp/certs
ENV PIP_CERT=/opt/ca-bundle.crt REQUESTS_CA_BUNDLE=/opt/ca-bundle.crt SSL_CERT_FILE=/opt/ca-bundle.crt

RUN useradd --create-home --uid 10001 app
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv

# torch from the CUDA index; a separate layer so code changes do not re-download it. Wheels put
# in docker/wheels/ (untracked) are offered too: the CPU test image installs torch from there.
# Pinned: the version the test suite runs (the Makefile's TORCH_SPEC). Its CUDA wheels bring
# Triton 3.9; the attention kernel needs Triton >= 3.4 (checked below and again at run time,
# where an older one sends attention to SDPA with a warning). An unpinned torch would move
# under the kernel with every rebuild.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
COPY docker/wheels /tmp/wheels
RUN pip install --upgrade pip \
    && pip install "$TORCH_SPEC" --find-links /tmp/wheels \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    && rm -rf /tmp/wheels

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY audio audio
COPY model model
COPY training training
COPY server server
COPY clients clients
RUN pip install . \
    && python -c "import triton; from model.attention import MIN_TRITON, _version; \
assert _version(triton.__version__) >= MIN_TRITON, f'Triton {triton.__version__} < {MIN_TRITON}'"
# Exists in the image, owned by app, so a named volume mounted here is writable by app.
RUN mkdir -p /home/app/.cache/huggingface && chown -R app:app /home/app/.cache

USER app
# Weights are mounted, never baked in: ./weights -> /app/weights (see docker-compose.yml).
ENV HOST=0.0.0.0 PORT=8000 \
    SNAC_DIT_WEIGHTS=/app/weights/demo/dit SNAC_DIT_CODEC=/app/weights/demo/codec \
    HF_HOME=/home/app/.cache/huggingface
EXPOSE 8000
# /health answers once the model is loaded and warmed; allow for that in start-period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"
CMD ["python", "-m", "server"]
