"""`python -m hybridgl.evaluation ...`: the same as `python -m hybridgl evaluate ...`."""
import argparse
import logging
import os
import sys

from .cli import add_arguments, main


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridgl.evaluation")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "WARNING"))
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    from hybridgl.cli import UsageError

    try:
        return int(main(args) or 0)
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


sys.exit(run())
