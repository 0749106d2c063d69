"""The Triton kernels against the torch ops they replace, on the same inputs.

The kernels run in the Triton interpreter on CPU tensors. The interpreter rounds
fp32 -> bf16 by truncation where a GPU rounds to nearest even, so bf16 results here may
sit one bf16 step (per rounding) from the torch op's; fp32 results agree to fp32
rounding and pure copies (the KV cache writes) bit for bit.
"""

from __future__ import annotations

import os
import sys

import pytest

# Read when a kernel is decorated, triton's own (tl.sum, ...) at its import: a process
# that imported triton without it cannot interpret kernels.
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; set it in the "
                "environment", pytrace=False)
os.environ["TRITON_INTERPRET"] = "1"

import torch

pytest.importorskip("triton")

from services.worker.engine.model import ops, triton_ops
from services.worker.engine.model.attention import write_kv
from services.worker.engine.model.config import PRESETS, ModelConfig
from services.worker.engine.model.llama import RotaryTable

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 3, 17]
# 9/3 heads of 64 (hidden 576, not a power of two), 32/8 heads of 128 (hidden 4096),
# 4/2 heads of 16 (hidden 64).
MODELS = ["smollm2-135m", "llama-3-8b", "tiny-llama"]
NUM_BLOCKS, BLOCK_SIZE = 8, 8
BF16_STEP = 2.0 ** -7  # bf16 keeps 7 explicit mantissa bits: one rounding step, relative


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_close(got: torch.Tensor, expected: torch.Tensor, *, roundings: int = 1) -> None:
    """fp32: to fp32 rounding. bf16: within `roundings` bf16 steps of the value (the
    interpreter truncates where torch rounds to nearest), plus as much absolute slack
    for results that cancel from larger terms."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        tol = roundings * BF16_STEP
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


def _rotary(cfg: ModelConfig, num_tokens: int, dtype: torch.dtype,
            seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    table = RotaryTable(cfg, 4096, device=torch.device("cpu"), dtype=dtype)
    positions = torch.randint(0, 4096, (num_tokens,),
                              generator=torch.Generator().manual_seed(seed))
    return table.lookup(positions)


def _slot_mapping(num_tokens: int, *, seed: int) -> torch.Tensor:
    """Distinct slots scattered over shuffled blocks; rows 1 and T-1 are padding (-1)
    when T >= 3."""
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE,
                           generator=torch.Generator().manual_seed(seed))[:num_tokens]
    if num_tokens >= 3:
        slots[[1, num_tokens - 1]] = -1
    return slots


def _caches(cfg: ModelConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    return _randn(*shape, dtype=dtype, seed=100), _randn(*shape, dtype=dtype, seed=101)


def _expected_caches(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """attention.write_kv on copies of the caches, padding rows left out."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    is_real = slots >= 0
    write_kv(k[is_real], v[is_real], k_cache, v_cache, slots[is_real])
    return k_cache, v_cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 4096])
@pytest.mark.parametrize("num_rows", ROWS)
def test_rms_norm_matches_torch_op(dtype, hidden, num_rows):
    x = _randn(num_rows, hidden, dtype=dtype, seed=hidden + num_rows)
    weight = _randn(hidden, dtype=dtype, seed=1)
    x_before = x.clone()
    got = triton_ops.rms_norm(x, weight, 1e-5)
    # Two roundings: the normalized row, then the product with the weight.
    _assert_close(got, ops.rms_norm(x, weight, 1e-5), roundings=2)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 4096])
@pytest.mark.parametrize("num_rows", ROWS)
def test_add_rms_norm_adds_into_x_in_place_and_matches_torch_op(dtype, hidden, num_rows):
    x = _randn(num_rows, hidden, dtype=dtype, seed=hidden + num_rows)
    delta = _randn(num_rows, hidden, dtype=dtype, seed=2)
    weight = _randn(hidden, dtype=dtype, seed=3)
    expected_x, expected_h = ops.add_rms_norm(x, delta, weight, 1e-5)
    got_x, got_h = triton_ops.add_rms_norm(x, delta, weight, 1e-5)
    assert got_x is x
    _assert_close(x, expected_x)
    # The sum's rounding, then the norm's two.
    _assert_close(got_h, expected_h, roundings=3)


def test_rms_norm_reads_rows_with_a_row_stride():
    buffer = _randn(5, 1000, dtype=torch.float32, seed=4)
    x = buffer[:, :576]  # rows 1000 apart
    weight = _randn(576, dtype=torch.float32, seed=5)
    _assert_close(triton_ops.rms_norm(x, weight, 1e-6), ops.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [64, 576, 1536])
@pytest.mark.parametrize("num_rows", ROWS)
def test_silu_mul_matches_torch_op(dtype, intermediate, num_rows):
    gate_up = _randn(num_rows, 2 * intermediate, dtype=dtype, seed=intermediate + num_rows) * 3
    got = triton_ops.silu_mul(gate_up)
    _assert_close(got, ops.silu_mul(gate_up), roundings=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("num_tokens", ROWS)
def test_rope_rotates_q_and_k_heads_in_place_and_leaves_v(dtype, model, num_tokens):
    cfg = PRESETS[model]
    h_q, h_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = _randn(num_tokens, (h_q + 2 * h_kv) * d, dtype=dtype, seed=num_tokens)
    cos, sin = _rotary(cfg, num_tokens, dtype, seed=num_tokens)
    expected = ops.rope(qkv, cos, sin, h_q + h_kv, d)
    before = qkv.clone()
    got = triton_ops.rope(qkv, cos, sin, h_q + h_kv, d)
    assert got.shape == (num_tokens, h_q + h_kv, d)
    assert got.data_ptr() == qkv.data_ptr()  # a view of qkv, rotated in place
    # Three roundings: x * cos, rotate_half(x) * sin and their sum.
    _assert_close(got, expected, roundings=3)
    assert torch.equal(qkv[:, (h_q + h_kv) * d:], before[:, (h_q + h_kv) * d:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("num_tokens", ROWS)
def test_write_kv_matches_attention_write_kv_and_skips_padding(dtype, model, num_tokens):
    cfg = PRESETS[model]
    h_q, h_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = _randn(num_tokens, (h_q + 2 * h_kv) * d, dtype=dtype, seed=num_tokens)
    # Views into qkv, as the layer passes them: rows (H + 2 Hkv) * D apart.
    k = qkv[:, h_q * d: (h_q + h_kv) * d].view(num_tokens, h_kv, d)
    v = qkv[:, (h_q + h_kv) * d:].view(num_tokens, h_kv, d)
    k_cache, v_cache = _caches(cfg, dtype)
    slots = _slot_mapping(num_tokens, seed=num_tokens)
    expected_k_cache, expected_v_cache = _expected_caches(k, v, k_cache, v_cache, slots)
    triton_ops.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k_cache)
    assert torch.equal(v_cache, expected_v_cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", MODELS[:2])  # the slowest test here: head_dim 16 is left
@pytest.mark.parametrize("num_tokens", ROWS)  # to test_rope
def test_rope_write_kv_matches_rope_then_write_kv(dtype, model, num_tokens):
    cfg = PRESETS[model]
    h_q, h_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = _randn(num_tokens, (h_q + 2 * h_kv) * d, dtype=dtype, seed=num_tokens)
    cos, sin = _rotary(cfg, num_tokens, dtype, seed=num_tokens)
    k_cache, v_cache = _caches(cfg, dtype)
    slots = _slot_mapping(num_tokens, seed=num_tokens)

    # The torch ops, as the layer calls them.
    rotated = ops.rope(qkv, cos, sin, h_q + h_kv, d)
    v = qkv[:, (h_q + h_kv) * d:].view(num_tokens, h_kv, d)
    expected_k_cache, expected_v_cache = _expected_caches(rotated[:, h_q:], v, k_cache,
                                                          v_cache, slots)
    # The separate Triton ops: the same arithmetic, so the same bits.
    separate_qkv, separate_k_cache, separate_v_cache = qkv.clone(), k_cache.clone(), v_cache.clone()
    separate = triton_ops.rope(separate_qkv, cos, sin, h_q + h_kv, d)
    triton_ops.write_kv(separate[:, h_q:], separate_qkv[:, (h_q + h_kv) * d:].view(-1, h_kv, d),
                        separate_k_cache, separate_v_cache, slots)

    v_before = qkv[:, (h_q + h_kv) * d:].clone()
    q = triton_ops.rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, h_q, h_kv, d)
    assert q.shape == (num_tokens, h_q, d) and q.data_ptr() == qkv.data_ptr()
    k_in_qkv = qkv[:, h_q * d: (h_q + h_kv) * d].view(num_tokens, h_kv, d)
    _assert_close(q, rotated[:, :h_q], roundings=3)
    _assert_close(k_in_qkv, rotated[:, h_q:], roundings=3)  # k rotated in place too
    _assert_close(k_cache, expected_k_cache, roundings=3)
    assert torch.equal(v_cache, expected_v_cache)
    assert torch.equal(qkv[:, (h_q + h_kv) * d:], v_before)
    assert torch.equal(qkv, separate_qkv)
    assert torch.equal(k_cache, separate_k_cache)
    assert torch.equal(v_cache, separate_v_cache)


def test_rope_write_kv_with_only_padding_rows_leaves_the_caches_untouched():
    cfg = PRESETS["smollm2-135m"]
    h_q, h_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = _randn(3, (h_q + 2 * h_kv) * d, dtype=torch.bfloat16, seed=6)
    cos, sin = _rotary(cfg, 3, torch.bfloat16, seed=6)
    k_cache, v_cache = _caches(cfg, torch.bfloat16)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.full((3,), -1, dtype=torch.int64)
    triton_ops.rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, h_q, h_kv, d)
    triton_ops.write_kv(qkv[:, : h_kv * d].view(3, h_kv, d), qkv[:, : h_kv * d].view(3, h_kv, d),
                        k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_before)
    assert torch.equal(v_cache, v_before)


def test_make_layer_ops_replaces_the_fused_ops_and_keeps_the_rest():
    layer_ops = triton_ops.make_layer_ops(ops.TORCH_OPS)
    assert layer_ops.rms_norm is triton_ops.rms_norm
    assert layer_ops.add_rms_norm is triton_ops.add_rms_norm
    assert layer_ops.silu_mul is triton_ops.silu_mul
    assert layer_ops.rope is triton_ops.rope
    assert layer_ops.write_kv is triton_ops.write_kv
    assert layer_ops.rope_write_kv is triton_ops.rope_write_kv
    assert layer_ops.linear is ops.TORCH_OPS.linear
    assert layer_ops.decode_attention is None and layer_ops.decode_layers is None
