"""The `genmesh` command line: one subcommand module per area."""

from __future__ import annotations

import argparse
import logging
import sys

from genmesh.commands import (
    batch,
    bench,
    cache,
    client,
    engine,
    fault,
    gateway,
    mesh,
    models,
    rollout,
    safety,
    secrets,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    models.register(sub)
    engine.register(sub)
    bench.register(sub)
    mesh.register(sub)
    client.register(sub)
    batch.register(sub)
    cache.register(sub)
    rollout.register(sub)
    gateway.register(sub)
    safety.register(sub)
    fault.register(sub)
    secrets.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (LookupError, ValueError, FileNotFoundError) as exc:
        print(f"genmesh: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
