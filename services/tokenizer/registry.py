"""The tokenizers this service serves, loaded from the model store at start."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from genmesh.core.models.chat_template import ChatTemplate, load_chat_template
from genmesh.core.models.store import ModelStore


class UnknownModelError(KeyError):
    """The requested model is not served here."""

    def __init__(self, name: str, served: Iterable[str]) -> None:
        super().__init__(name)
        self.name = name
        self.served = tuple(served)

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return (f"model {self.name!r} is not served by this tokenizer; "
                f"served models: {', '.join(self.served)}")


@dataclass(frozen=True, slots=True)
class LoadedTokenizer:
    """One model's tokenizer and what comes with it."""

    name: str  # the name clients use: the model's store name
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None  # None: the model folder has no chat template
    eos_token_ids: tuple[int, ...]  # tokens that end a generation
    vocab_size: int  # including added special tokens; valid ids are 0 .. vocab_size - 1


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def eos_token_ids(folder: Path, tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids of ``generation_config.json``'s eos_token_id (an id or a list), then of
    ``tokenizer_config.json``'s eos_token (a string or an added-token dict)."""
    ids: list[int] = []
    generation_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    if isinstance(generation_eos, int):
        ids.append(generation_eos)
    elif isinstance(generation_eos, list):
        ids.extend(i for i in generation_eos if isinstance(i, int))
    token = _read_json(folder / "tokenizer_config.json").get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and (token_id := tokenizer.token_to_id(token)) is not None:
        ids.append(token_id)
    return tuple(dict.fromkeys(ids))  # unique, in order


def load_tokenizer(name: str, folder: Path) -> LoadedTokenizer:
    """Reads ``tokenizer.json``, the chat template and the eos tokens of a model folder."""
    path = folder / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"model {name!r} has no tokenizer.json in {folder}")
    tokenizer = Tokenizer.from_file(str(path))
    template = load_chat_template(folder)
    return LoadedTokenizer(
        name=name,
        tokenizer=tokenizer,
        chat_template=ChatTemplate(template) if template is not None else None,
        eos_token_ids=eos_token_ids(folder, tokenizer),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
    )


class TokenizerRegistry:
    """Served tokenizers by model name. Read-only after start."""

    def __init__(self, tokenizers: Iterable[LoadedTokenizer]) -> None:
        self._by_name: dict[str, LoadedTokenizer] = {}
        for t in tokenizers:
            if t.name in self._by_name:
                raise ValueError(f"model {t.name!r} is listed twice")
            self._by_name[t.name] = t

    @classmethod
    def from_store(cls, store: ModelStore, names: Iterable[str]) -> TokenizerRegistry:
        """Loads each named model's tokenizer; raises ModelNotFoundError for a name the
        store lacks."""
        return cls(load_tokenizer(name, store.path_of(name)) for name in names)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> LoadedTokenizer:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownModelError(name, self._by_name) from None

    def __iter__(self) -> Iterator[LoadedTokenizer]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)
