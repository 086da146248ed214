#!/usr/bin/env bash
# The backend's production start: fetch missing weights once (into MODEL_DIR, a volume), then
# gunicorn with ONE worker and threads, never --preload (CUDA does not survive fork), no worker
# timeout (loading SAM ViT-H and CLIP takes a while; predictions on CPU take long too).
set -euo pipefail
export MODEL_DIR="${MODEL_DIR:-/data/models}"
if [ "${HYBRIDGL_SKIP_DOWNLOAD:-0}" != "1" ] && [ "${HF_HUB_OFFLINE:-0}" != "1" ]; then
  sam="${HYBRIDGL_SAM_MODEL:-vit_h}"
  if [ -n "${HYBRIDGL_SAM_CHECKPOINT:-}" ] || [[ "$sam" == *:* ]] || [ "$sam" = "none" ]; then sam=none; fi
  python -m hybridgl.weights check --sam "$sam" --clip "${HYBRIDGL_CLIP_MODEL:-openai/clip-vit-base-patch16}" --stanza \
    || python -m hybridgl.weights download --sam "$sam" --clip "${HYBRIDGL_CLIP_MODEL:-openai/clip-vit-base-patch16}" --stanza
fi
exec gunicorn --bind "0.0.0.0:${PORT:-9090}" --workers 1 --threads "${THREADS:-8}" --timeout 0 \
  --graceful-timeout 30 --access-logfile - "backend._wsgi:app"
