"""Start the real backend app (the production app factory) on the tiny test models, as its own process.

    python tests/e2e/serve_tiny.py --host 127.0.0.1 --port 9090 [--alternatives 2]

Everything is the production path, configured the production way (environment variables):
`backend._wsgi.create_app()` -> `Settings.from_env()` -> `HybridGL.from_pretrained` -> Flask's
threaded server. Only the models differ: the tiny CLIP of the fixtures
(HYBRIDGL_CLIP_MODEL=<dir>), the tiny SAM through a builder with a checkpoint file
(HYBRIDGL_SAM_MODEL=tiny_models:tiny_sam_builder, HYBRIDGL_SAM_CHECKPOINT=<file>), and
thresholds at which random SAM weights propose masks (HYBRIDGL_CONFIG=<inline JSON>). Variables
already set in the environment win.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import torch  # noqa: E402

from tiny_models import PERMISSIVE, TINY_CLIP_DIR, save_tiny_sam  # noqa: E402


def tiny_environment(workdir: Path, alternatives: int = 1) -> dict[str, str]:
    """The environment that makes the production loader build the tiny models."""
    return {
        "HYBRIDGL_CLIP_MODEL": str(TINY_CLIP_DIR),
        "HYBRIDGL_SAM_MODEL": "tiny_models:tiny_sam_builder",
        "HYBRIDGL_SAM_CHECKPOINT": str(save_tiny_sam(workdir / "tiny-sam.pt")),
        "HYBRIDGL_CONFIG": json.dumps(PERMISSIVE),
        "HYBRIDGL_PARSER": "rules",
        "HYBRIDGL_ALTERNATIVES": str(alternatives),
        "DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
    }


def command_environment(workdir: Path, model_dir: Path) -> dict[str, str]:
    """The environment for running one of our commands (`python -m backend.preannotate`, ...) as a
    subprocess on the tiny models: this process's environment without any HYBRIDGL_ or
    LABEL_STUDIO_ setting of the caller's, the tiny models, MODEL_DIR, our code on the path, and
    one thread (the test machine's cores are shared with Label Studio and the backend)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYBRIDGL_", "LABEL_STUDIO_"))}
    env.update(tiny_environment(workdir))
    env.update({"MODEL_DIR": str(model_dir), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])})
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--alternatives", type=int, default=None, help="HYBRIDGL_ALTERNATIVES (default: env or 1)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # bit-identical to the test process that recomputes the masks
    workdir = Path(tempfile.mkdtemp(prefix="hybridgl-serve-tiny-"))
    for name, value in tiny_environment(workdir, args.alternatives or 1).items():
        if name == "HYBRIDGL_ALTERNATIVES" and args.alternatives is not None:
            os.environ[name] = value
        else:
            os.environ.setdefault(name, value)

    from backend._wsgi import create_app

    app = create_app()
    shutil.rmtree(workdir, ignore_errors=True)  # the checkpoint is loaded
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as `python -m backend`: exit handlers run
    app.run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
