"""The engine's one configuration object, built once by the entry point."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Backend(enum.Enum):
    NATIVE = "native"  # genmesh's own PyTorch engine (CPU or CUDA)
    TENSORRT_LLM = "tensorrt_llm"  # tensorrt_llm.LLM on NVIDIA GPUs


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str  # HF folder path; with load_format="dummy" also a preset name (see PRESETS)
    backend: Backend = Backend.NATIVE
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    load_format: str = "auto"  # "auto" reads safetensors; "dummy" uses random weights
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # pool size; None: derived from kv_cache_memory_gib
    kv_cache_memory_gib: float = 1.0  # KV pool memory when num_kv_blocks is None
    max_num_seqs: int = 128  # most requests running at once
    max_num_batched_tokens: int = 512  # token budget per step (prefill chunks + decodes)
    max_model_len: int | None = None  # context cap; None: the model's own (and the pool's)
    enable_prefix_caching: bool = True
    use_cpu_kernels: bool = True  # compiled AVX512-BF16 decode kernels (bf16 on CPU)
    # Triton kernels (paged attention in place, fused small ops). None: on CUDA where
    # triton imports; True on a CPU runs them under TRITON_INTERPRET=1 (tests only).
    use_triton: bool | None = None
    # Decode steps as CUDA graphs over padded batch sizes. None: on CUDA with Triton;
    # True on a CPU runs the same padded static-buffer path without capture (tests).
    cuda_graphs: bool | None = None
    cuda_graph_max_batch_size: int = 256  # largest captured batch (capped at max_num_seqs)
    # Schedule and launch step N+1 before reading step N's tokens back, so the host's
    # work overlaps the device's. None: on CUDA (on a CPU the forward is synchronous and
    # there is nothing to overlap; True there is for tests).
    async_scheduling: bool | None = None
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default
    # Folder whose tokenizer.json enforces constraints (structured output); None: the
    # model folder. A model without one serves free text only.
    tokenizer: str | None = None
    seed: int = 0  # dummy weights only
    # Weight-only quantization of the decoder layers' matmuls (model/quant.py): "none",
    # "int8" or "int4", with one scale per quant_group_size input columns (None: int8 in
    # groups of 64, int4 in groups of 32, GGUF's Q4 block; 0: int8 per output channel).
    quantization: str = "none"
    quant_group_size: int | None = None
    # With quantization, the LM head too, as int8 in groups of 32 (the embedding rows
    # stay as loaded): a small model's head is a fifth of its bytes.
    quantize_lm_head: bool = True
    # A quantized head read in two passes on the CPU (quant.ShortlistHead): every logit
    # from an int4 copy, then this many of each row's highest again from the int8 head;
    # 0 reads the int8 head alone.
    lm_head_shortlist: int = 64
    # Speculative decoding (speculative.py): "off", "ngram" (drafts looked up in the
    # request's own prompt and output) or "draft" (a small model sharing the tokenizer
    # proposes; speculative_draft_model is its folder, or a dummy preset). Up to
    # num_speculative_tokens drafts a step are verified in one forward pass (fewer
    # where a request's measured acceptance makes fewer pay, speculative.py).
    speculative: str = "off"
    num_speculative_tokens: int = 8
    speculative_draft_model: str | None = None
    speculative_draft_quantization: str = "none"  # the draft's weights: none | int8 | int4
    # Whether a request that does not say speculates (its SamplingParams.speculative).
    speculative_by_default: bool = True
    # No request speculates in a step that runs more requests than this: a large batch
    # already keeps the matmuls busy, and its verification rows would only add work.
    speculative_max_batch: int = 4
    ngram_min: int = 1  # n-gram lookup: the shortest suffix matched (tokens)
    ngram_max: int = 6  # the longest tried first

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.quantization not in ("none", "int8", "int4"):
            raise ValueError(f"quantization must be none, int8 or int4, got "
                             f"{self.quantization!r}")
        if self.quant_group_size not in (None, 0) and (self.quant_group_size < 32
                                                       or self.quant_group_size % 32):
            raise ValueError(f"quant_group_size must be a multiple of 32 (0: int8 per "
                             f"output channel), got {self.quant_group_size}")
        if self.lm_head_shortlist < 0:
            raise ValueError(f"lm_head_shortlist must be >= 0, got {self.lm_head_shortlist}")
        if self.quant_group_size == 0 and self.quantization == "int4":
            raise ValueError("int4 has no per-channel mode: give quant_group_size a "
                             "multiple of 32, or leave it for the default 32")
        if self.cuda_graph_max_batch_size < 1:
            raise ValueError("cuda_graph_max_batch_size must be >= 1")
        if self.speculative not in ("off", "ngram", "draft"):
            raise ValueError(f"speculative must be off, ngram or draft, got "
                             f"{self.speculative!r}")
        if self.speculative == "draft" and not self.speculative_draft_model:
            raise ValueError("speculative='draft' needs speculative_draft_model")
        if self.speculative_draft_quantization not in ("none", "int8", "int4"):
            raise ValueError(f"speculative_draft_quantization must be none, int8 or int4, "
                             f"got {self.speculative_draft_quantization!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got "
                             f"{self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, "
                             f"{self.ngram_max}")
        if self.speculative_max_batch < 1:
            raise ValueError("speculative_max_batch must be >= 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
