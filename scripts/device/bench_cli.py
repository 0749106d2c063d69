"""`genmesh bench ...` without the rest of the CLI: only genmesh.commands.bench is
imported, so the engine bench runs even where the mesh's packages (grpc health, redis,
OpenTelemetry) failed to install. Usage: python bench_cli.py bench engine [flags]"""

from __future__ import annotations

import argparse
import logging
import sys

from genmesh.commands import bench

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="genmesh")
    bench.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    sys.exit(args.func(args))
