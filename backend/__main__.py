"""`python -m backend --host 127.0.0.1 --port 9090`: the backend on Flask's threaded server.

Production: `gunicorn --workers 1 --threads 8 --timeout 0 backend._wsgi:app` (see docker/start.sh).
"""
import argparse
import os
import signal
import sys

from ._wsgi import create_app
from .settings import SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend", description="HybridGL Label Studio ML backend")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 9090),
                        help="port (default $PORT or 9090)")
    args = parser.parse_args(argv)
    try:
        app = create_app()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # SIGTERM (docker stop) exits through the interpreter's exit path, which drains the webhook backlog
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app.run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
