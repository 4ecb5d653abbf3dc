# The snac-dit server on one NVIDIA GPU. Deploy with `docker compose up` (docs/server.md).
# Install steps are the Makefile's: torch first (here its CUDA build), then this package.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# gcc + python3-dev: Triton compiles its small C launcher on first kernel use, at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 app
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv

# torch from the CUDA index; a separate layer so code changes do not re-download it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --upgrade pip && pip install torch --index-url "$TORCH_INDEX_URL"

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY model model
COPY training training
COPY server server
COPY clients clients
RUN pip install .
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
