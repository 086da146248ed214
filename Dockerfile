# HybridGL Label Studio ML backend (GPU by default; see docs/deploy.md).
#
# Base image: python:3.11-slim + torch from PyPI, not pytorch/pytorch:*-cuda*-runtime. On Linux
# x86_64 the PyPI torch wheel IS a CUDA build (the CUDA runtime, cuBLAS and cuDNN come with it as
# nvidia-* wheels), so the host only needs the NVIDIA driver and the NVIDIA container toolkit. A
# pytorch/pytorch base ships its own torch (another version), and `pip install -r requirements.txt`
# (torch==2.14.1) would install a second one on top: several GB twice. requirements.txt stays the
# one list of versions.
# CPU-only image (a few GB smaller, no CUDA libraries): build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   (docker-compose.cpu.yml does)
# which installs the same torch/torchvision versions as CPU builds ("2.14.1+cpu" satisfies ==2.14.1).
#
# Weights are NOT baked in by default: the first start fetches them into the /data/models volume
# (SAM ViT-H 2.4 GB, CLIP ViT-B/16 0.6 GB, stanza a few hundred MB; SHA-256 checked, resumable) and
# later starts find them there. That keeps the image ~3.5 GB smaller and rebuilds fast, and the
# volume survives image upgrades. For machines that cannot download at start, either pre-seed the
# volume (`python -m hybridgl.weights download` elsewhere, copy MODEL_DIR; see docs/deploy.md) or
# build with
#   --build-arg PREFETCH_WEIGHTS=1
# which bakes them into /data/models: Docker copies them into a new, empty named volume on first use.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=
ARG PREFETCH_WEIGHTS=0
ARG WITH_RAY=0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    MODEL_DIR=/data/models \
    HF_HOME=/data/models/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PORT=9090 \
    THREADS=8

# curl: the health check; libglib2.0-0: OpenCV (headless) needs it. (Debian's current versions.)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        grep -E '^(torch|torchvision)==' requirements.txt > /tmp/torch.txt \
        && pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt \
        && rm /tmp/torch.txt; \
    fi \
    && pip install -r requirements.txt

# Optional Ray (the compose file's "ray" profile builds with WITH_RAY=1): the plain backend stays lean.
COPY requirements-ray.txt ./
RUN if [ "$WITH_RAY" = "1" ]; then pip install -r requirements-ray.txt; fi

COPY hybridgl ./hybridgl
COPY backend ./backend
COPY docker/start.sh ./docker/start.sh

# Never run as root (a numeric USER, so that runAsNonRoot-style checks can verify it). The model
# volume ends up owned by this user: a new named volume takes the ownership of the image's
# directory; a bind mount must be writable by uid 1000.
RUN useradd --create-home --uid 1000 --user-group hybridgl \
    && mkdir -p /data/models \
    && chown -R hybridgl:hybridgl /data/models
USER 1000:1000

# Optional: bake the weights in (see above). Must come before VOLUME, which freezes the directory.
RUN if [ "$PREFETCH_WEIGHTS" = "1" ]; then python -m hybridgl.weights download --stanza; fi

VOLUME ["/data/models"]
EXPOSE 9090

# Healthy once the models are loaded and /health answers. The start period covers the first start's
# downloads (a few GB) and the model load; failures during it do not count. Shell form: it reads
# PORT and the optional basic auth at run time.
# hadolint ignore=DL3025
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 \
    CMD curl -fsS -o /dev/null ${BASIC_AUTH_USER:+-u "$BASIC_AUTH_USER:$BASIC_AUTH_PASS"} "http://127.0.0.1:${PORT:-9090}/health" || exit 1

# docker/start.sh holds the one gunicorn command (1 worker, threads, no --preload): see that file.
CMD ["bash", "/app/docker/start.sh"]
