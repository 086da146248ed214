"""`python -m backend --host 127.0.0.1 --port 9090`: the backend on Flask's threaded server."""
import argparse
import os

from ._wsgi import create_app

parser = argparse.ArgumentParser(prog="python -m backend", description="HybridGL Label Studio ML backend")
parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")))
args = parser.parse_args()
create_app().run(host=args.host, port=args.port, threaded=True)
