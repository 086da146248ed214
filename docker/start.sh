#!/usr/bin/env bash
# The backend's production start: the image runs it (Dockerfile CMD), the tests run it, and so can
# you without Docker. It is the ONE place that holds the gunicorn command.
#
# 1. Weights: `python -m hybridgl.weights download` fetches whatever MODEL_DIR lacks (SAM checkpoint,
#    CLIP snapshot, stanza's English models) and does nothing when everything is there. Offline
#    (HF_HUB_OFFLINE=1 / HYBRIDGL_OFFLINE=1) it only checks and stops here with a message naming
#    what is missing (stanza's models only with HYBRIDGL_PARSER=stanza: `auto` falls back to the
#    rules parser without them). HYBRIDGL_SKIP_DOWNLOAD=1 skips the step (weights given as local paths).
# 2. gunicorn with ONE worker (the models are loaded once, inside that worker) and threads (Label
#    Studio's /health and /setup calls are answered while a prediction runs; predictions themselves
#    take the model one at a time). Never --preload: the app would load the models in the master
#    and CUDA does not survive fork. The worker timeout only has to cover loading the models
#    (a gthread worker keeps heart-beating while its threads work): GUNICORN_TIMEOUT, 600 s.
#    More gunicorn settings: GUNICORN_CMD_ARGS (gunicorn's own variable).
set -euo pipefail
cd "$(dirname "$0")/.."  # the directory holding hybridgl/ and backend/ (/app in the image)
PYTHON="${PYTHON:-python}"
export MODEL_DIR="${MODEL_DIR:-$HOME/.cache/hybridgl}"

if [ "${HYBRIDGL_SKIP_DOWNLOAD:-0}" != "1" ]; then
  sam="${HYBRIDGL_SAM_MODEL:-vit_h}"
  checkpoint="${HYBRIDGL_SAM_CHECKPOINT:-}"
  case "$sam:$checkpoint" in
    vit_h:|vit_l:|vit_b:) sam_args=(--sam "$sam") ;;                            # the official file
    vit_h:http*://*|vit_l:http*://*|vit_b:http*://*) sam_args=(--sam "$sam" --sam-url "$checkpoint") ;;
    *) sam_args=(--sam none) ;;  # a local checkpoint, a builder ("pkg.mod:fn"), none: nothing to fetch here
  esac
  stanza_args=()
  case "${HYBRIDGL_PARSER:-auto}" in stanza) stanza_args=(--stanza) ;; esac
  "$PYTHON" -m hybridgl.weights download "${sam_args[@]}" \
    --clip "${HYBRIDGL_CLIP_MODEL:-openai/clip-vit-base-patch16}" "${stanza_args[@]}"
  # auto parses with the rules parser when stanza's models are not there: fetching them may fail
  if [ "${HYBRIDGL_PARSER:-auto}" = auto ]; then
    "$PYTHON" -m hybridgl.weights download --sam none --clip none --stanza \
      || echo "start.sh: stanza's models could not be fetched; HYBRIDGL_PARSER=auto parses with the rules parser" >&2
  fi
fi

# the access log shows paths without their query strings (presigned signatures, a webhook secret) and
# no referer: %(U)s is the path alone, where gunicorn's default %(r)s is the whole request line
access_format='%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(L)ss'

worker_tmp=()
# the worker's heartbeat file on tmpfs, not on the container's overlay filesystem
if [ -d /dev/shm ] && [ -w /dev/shm ]; then worker_tmp=(--worker-tmp-dir /dev/shm); fi

exec "$PYTHON" -m gunicorn "backend._wsgi:app" --bind "0.0.0.0:${PORT:-9090}" \
  --workers 1 --worker-class gthread --threads "${THREADS:-8}" --timeout "${GUNICORN_TIMEOUT:-600}" \
  --graceful-timeout 30 --access-logfile - --access-logformat "$access_format" --error-logfile - \
  "${worker_tmp[@]}"
