"""`genmesh models pull|list`: the local model store."""

from __future__ import annotations

import argparse

from genmesh.core.models.store import ModelStore, default_store_root, known_sources


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="build and list models in the local store")
    msub = p.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="build a known model into the store")
    pull.add_argument("name", help=f"one of: {', '.join(known_sources())}")
    pull.add_argument("--force", action="store_true", help="rebuild even if present")
    pull.set_defaults(func=_pull)
    ls = msub.add_parser("list", help="list the models in the store")
    ls.set_defaults(func=_list)


def _pull(args: argparse.Namespace) -> int:
    store = ModelStore(default_store_root())
    path = store.pull(args.name, force=args.force)
    print(f"{args.name}: {path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    store = ModelStore(default_store_root())
    models = store.list()
    print(f"model store: {store.root}")
    if not models:
        print(f"  (empty; known models: {', '.join(known_sources())})")
    for m in models:
        print(f"  {m.name:<28} {m.size_bytes / 2**20:8.1f} MiB  {m.source}  {m.path}")
    return 0
