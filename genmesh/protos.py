"""Generate the Python gRPC code for ``protos/`` (run by ``make``; never committed).

``python -m genmesh.protos`` writes ``genmesh/v1/*_pb2.py``, ``*_pb2.pyi`` and
``*_pb2_grpc.py`` next to this package, from ``protos/genmesh/v1/*.proto``.
"""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "protos"


def generate(proto_root: Path = PROTO_ROOT, out: Path = REPO_ROOT) -> list[Path]:
    """Compile every .proto under ``proto_root`` into ``out``; returns the proto files."""
    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    files = sorted(proto_root.rglob("*.proto"))
    args = ["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *map(str, files)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_root}")
    return files


if __name__ == "__main__":
    generated = generate()
    print(f"generated Python code for {len(generated)} proto files", file=sys.stderr)
    sys.exit(0)
