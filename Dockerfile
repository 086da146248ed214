# HybridGL Label Studio ML backend, GPU-ready.
# python:3.11-slim + the PyPI torch wheel: that wheel is a CUDA build carrying its own CUDA
# runtime, so the host needs only the NVIDIA driver (and the container toolkit); a pytorch/pytorch
# base would install a second torch on top of it.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODEL_DIR=/data/models \
    STANZA_RESOURCES_DIR=/data/models/stanza \
    HF_HOME=/data/models/huggingface \
    PORT=9090 \
    THREADS=8

RUN apt-get update && apt-get install -y --no-install-recommends curl libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY pyproject.toml README.md ./
COPY hybridgl ./hybridgl
COPY backend ./backend
COPY docker/start.sh /app/start.sh
RUN pip install --no-deps . && chmod +x /app/start.sh

# Weights are fetched on first start into the /data/models volume, not baked in: the image stays
# ~6 GB instead of ~9 GB, and a machine without internet can be pre-seeded by copying MODEL_DIR.
RUN useradd --create-home --uid 1000 hybridgl && mkdir -p /data/models && chown -R hybridgl /data
USER hybridgl
VOLUME ["/data/models"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1

CMD ["/app/start.sh"]
