"""Start the real backend app (the production app factory) on the tiny test models, as its own process.

    python tests/e2e/serve_tiny.py --host 127.0.0.1 --port 9090 [--alternatives 1]

The tiny SAM runs at permissive thresholds so that it proposes masks; everything else is the
production path: HybridGL.from_pretrained, HybridGLBackend, create_app, Flask's threaded server.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import torch  # noqa: E402

from backend._wsgi import create_app  # noqa: E402
from backend.model import HybridGLBackend  # noqa: E402
from backend.settings import Settings  # noqa: E402
from tiny_models import tiny_hybridgl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--alternatives", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)  # bit-identical to the test process that recomputes the masks
    settings = Settings.from_env()
    settings = Settings(**{**settings.__dict__, "alternatives": args.alternatives})
    backend = HybridGLBackend(tiny_hybridgl(sam=True), settings)
    create_app(backend).run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
