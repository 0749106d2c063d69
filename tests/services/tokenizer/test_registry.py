from __future__ import annotations

import json

import pytest

from genmesh.core.models.store import ModelNotFoundError, ModelStore
from services.tokenizer.registry import (
    TokenizerRegistry,
    UnknownModelError,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def registry(model_dir) -> TokenizerRegistry:
    return TokenizerRegistry.from_store(ModelStore(model_dir.parent), [model_dir.name])


def test_loads_the_default_model_from_the_store(registry, model_dir):
    t = registry.get(model_dir.name)
    assert registry.names == [model_dir.name] and len(registry) == 1
    assert t.vocab_size == 49152
    assert t.eos_token_ids == (2,)  # <|im_end|>, from both config files
    assert t.tokenizer.id_to_token(2) == "<|im_end|>"
    assert t.chat_template is not None
    assert t.tokenizer.encode("Hello world").ids == [19556, 905]


def test_unknown_model_is_a_key_error_listing_the_served_models(registry, model_dir):
    with pytest.raises(KeyError) as err:
        registry.get("gpt-9")
    assert isinstance(err.value, UnknownModelError)
    assert str(err.value) == (f"model 'gpt-9' is not served by this tokenizer; "
                              f"served models: {model_dir.name}")


def test_a_name_missing_from_the_store_fails_at_load(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        TokenizerRegistry.from_store(ModelStore(tmp_path), ["no-such-model"])


def test_eos_ids_from_a_list_and_a_token_dict_and_no_chat_template(tmp_path, model_dir):
    (tmp_path / "tokenizer.json").symlink_to(model_dir / "tokenizer.json")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_start|>", "special": True}}))
    t = load_tokenizer("bare", tmp_path)
    assert (t.name, t.eos_token_ids, t.chat_template) == ("bare", (0, 2, 1), None)


def test_a_folder_without_tokenizer_json_fails_at_load(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        load_tokenizer("empty", tmp_path)


def test_a_model_listed_twice_is_an_error(registry, model_dir):
    t = registry.get(model_dir.name)
    with pytest.raises(ValueError, match="listed twice"):
        TokenizerRegistry([t, t])
