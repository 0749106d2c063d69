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
    pull.add_argument("--quant", choices=("int8", "int4"),
                      help="also build the layers quantized (int4 of a GGUF model: from its "
                           "own 4-bit blocks), for workers started with --quantization")
    pull.add_argument("--quant-group-size", type=int, default=None,
                      help="input columns per scale (default: int8 64, int4 32; 0: int8 "
                           "per output channel)")
    pull.set_defaults(func=_pull)
    ls = msub.add_parser("list", help="list the models in the store")
    ls.set_defaults(func=_list)


def _pull(args: argparse.Namespace) -> int:
    store = ModelStore(default_store_root())
    path = store.pull(args.name, force=args.force)
    print(f"{args.name}: {path}")
    if args.quant:
        from services.worker.engine.model import prebuilt
        from services.worker.engine.model.config import load_model_config
        from services.worker.engine.model.quant import Quantization

        out, source = prebuilt.build(path, load_model_config(path), Quantization(args.quant),
                                     args.quant_group_size)
        print(f"{args.name} {args.quant}: {out} (from the {source} weights)")
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
