"""Weight-only quantization: the formats, the CPU kernels against dequantized weights,
and GGUF Q4_1 blocks taken as they are."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from services.worker.engine.model import cpu_kernels, prebuilt
from services.worker.engine.model.config import load_model_config
from services.worker.engine.model.quant import (
    PER_CHANNEL,
    Quantization,
    QuantizedWeight,
    linear,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

kernels = cpu_kernels.load()
needs_kernels = pytest.mark.skipif(kernels is None,
                                   reason="needs an AVX512-BF16 CPU and a compiler")


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)


def test_int4_packs_weights_i_and_i_plus_16_in_one_byte():
    q = torch.arange(64, dtype=torch.uint8).remainder(16).view(1, 64)
    packed = pack_int4(q)
    assert packed.shape == (1, 32)
    # block 0: byte i = q[i] | q[i + 16] << 4 with q[i] = i % 16
    assert packed[0, :3].tolist() == [0 | 0 << 4, 1 | 1 << 4, 2 | 2 << 4]
    assert torch.equal(unpack_int4(packed), q)


def test_int8_per_channel_and_grouped_round_to_the_nearest_step():
    w = weight(8, 64)
    for group in (None, 32):
        qw = quantize_int8(w, group)
        assert qw.q.dtype == torch.int8 and qw.bits == 8
        assert qw.scales.shape == ((8, 1) if group is None else (8, 2))
        step = qw.scales.repeat_interleave(qw.group_size, dim=1)
        assert ((qw.dequantize().float() - w.float()).abs() <= step / 2 + 1e-3).all()


def test_int4_groups_map_min_and_max_onto_0_and_15():
    w = weight(4, 64)
    qw = quantize_int4(w, 32)
    q = unpack_int4(qw.q)
    assert q.view(4, 2, 32).amin(-1).eq(0).all() and q.view(4, 2, 32).amax(-1).eq(15).all()
    step = qw.scales.repeat_interleave(32, dim=1)
    assert ((qw.dequantize().float() - w.float()).abs() <= step / 2 + 1e-3).all()
    assert qw.num_bytes() == 4 * 32 + 2 * 4 * 2 * 2  # nibbles, then fp16 scales and offsets


@pytest.mark.parametrize("group", [0, 32])
def test_a_group_must_be_a_multiple_of_32_dividing_the_width(group):
    with pytest.raises(ValueError,
                       match="group size must be a multiple of 32 dividing the input width 48"):
        quantize_int4(weight(2, 48), group or 48)


def test_int4_groups_span_whole_64_weight_blocks():
    with pytest.raises(ValueError, match="int4 groups are 32 or a multiple of 64"):
        quantize_int4(weight(2, 192), 96)
    with pytest.raises(ValueError, match="input width that is a multiple of 64"):
        quantize_int4(weight(2, 96), 32)
    assert quantize_int4(weight(2, 256), 128).group_size == 128


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("make", [
    lambda w: quantize_int8(w), lambda w: quantize_int8(w, 64), lambda w: quantize_int4(w, 32),
    lambda w: quantize_int4(w, 64), lambda w: quantize_int4(w, 128)],
    ids=["int8", "int8-g64", "int4-g32", "int4-g64", "int4-g128"])
def test_the_kernel_multiplies_by_the_dequantized_weight(rows, make):
    w = weight(577, 1536, seed=rows)
    qw: QuantizedWeight = make(w)
    x = torch.randn(rows, 1536, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    expected = F.linear(x.float(), qw.dequantize().float())
    offsets = qw.offsets if qw.offsets is not None else torch.empty(0)
    got = kernels.quantized_linear(x, qw.q, qw.scales, offsets).float()
    # fp32 sums either way; the kernel's output is rounded to bf16 once.
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@needs_kernels
def test_int8_sums_of_the_largest_values_over_a_wide_row_do_not_overflow():
    # Per channel over 16,384 inputs (an 8B model's down projection is 14,336 wide), every
    # weight at +127 steps and every activation at the row's largest (int16 32,767): each
    # int32 lane would sum 1,024 products of 32,767 * 127 (~4.3e9, past int32; without
    # the emptying it came out -19.5) if the kernel did not empty them into fp32 as it
    # goes. Row 1 is zeros: its scale is 0 and so is its output.
    k = 16384
    qw = quantize_int8(torch.full((3, k), 0.05, dtype=torch.bfloat16))
    x = torch.zeros(2, k, dtype=torch.bfloat16)
    x[0] = 3.0
    got = kernels.quantized_linear(x, qw.q, qw.scales, torch.empty(0)).float()
    expected = F.linear(x.float(), qw.dequantize().float())
    assert expected[0, 0].item() == pytest.approx(k * 3.0 * 0.05, rel=1e-3)
    torch.testing.assert_close(got, expected, rtol=4e-3, atol=0.0)
    assert torch.equal(got[1], torch.zeros(3))


def _int8_case(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 kernel's output for ``x`` against float64 arithmetic on the exact
    weights (q * scale; ``dequantize`` rounds them to bf16, off by 3000 * 1e-4 beside an
    activation of 3000), on groups of 64."""
    qw = quantize_int8(weight(576, 1536), 64)
    exact = qw.q.double() * qw.scales.double().repeat_interleave(64, dim=1)
    got = kernels.quantized_linear(x, qw.q, qw.scales, torch.empty(0)).double()
    return got, F.linear(x.double(), exact)


@needs_kernels
@pytest.mark.parametrize("size", [1e-20, 1e-36, 1e-39])
def test_int8_rows_of_tiny_values_are_computed_as_well_as_any(size):
    # 32767 over a row's largest value overflows fp32 under ~1e-34: such a row is scaled
    # up by 2^64 first (before, every output was off by ~3.6x its size).
    x = (torch.randn(1, 1536, generator=torch.Generator().manual_seed(2)) * size)
    got, expected = _int8_case(x.to(torch.bfloat16))
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()


@needs_kernels
@pytest.mark.parametrize("outlier", [10.0, 1000.0, 3000.0])
def test_int8_outliers_leave_the_rest_of_the_row_its_precision(outlier):
    # One activation `outlier` times the rest's size: kept apart in fp32, it does not set
    # the int16 step of the others (with one scale for the whole row, 1,000x and 3,000x
    # failed this bound). Each output within bf16 rounding of its value plus 2% of the
    # rest's typical share.
    x = torch.randn(1, 1536, generator=torch.Generator().manual_seed(1))
    x[0, 7] = 3.0 * outlier
    x = x.to(torch.bfloat16)
    got, expected = _int8_case(x)
    rest = x.clone()
    rest[0, 7] = 0
    _, rest_expected = _int8_case(rest)
    bound = expected.abs() * 2**-8 + 0.02 * rest_expected.pow(2).mean().sqrt()
    assert ((got - expected).abs() <= bound).all()


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_int8_a_nan_or_inf_in_a_row_makes_its_outputs_nan_and_no_others(bad):
    x = torch.randn(2, 1536, generator=torch.Generator().manual_seed(3))
    x[0, 100] = bad
    got, expected = _int8_case(x.to(torch.bfloat16))
    assert got[0].isnan().all()
    torch.testing.assert_close(got[1], expected[1], rtol=1e-2,
                               atol=1e-2 * expected[1].abs().max().item())


@needs_kernels
@pytest.mark.parametrize("make", [lambda w: quantize_int8(w), lambda w: quantize_int4(w, 32)],
                         ids=["int8", "int4-g32"])
def test_each_row_of_many_is_what_a_one_row_call_gives(make):
    # Speculative verification relies on it: a draft's row must match plain decoding.
    # (A last-bit difference once hid in ~1 of 3,000 outputs: many rows and seeds.)
    for seed in range(8):
        qw: QuantizedWeight = make(weight(960, 576, seed=seed))
        offsets = qw.offsets if qw.offsets is not None else torch.empty(0)
        x = torch.randn(5, 576, generator=torch.Generator().manual_seed(seed)).to(
            torch.bfloat16)
        many = kernels.quantized_linear(x, qw.q, qw.scales, offsets)
        for i in range(5):
            one = kernels.quantized_linear(x[i:i + 1], qw.q, qw.scales, offsets)
            assert torch.equal(many[i:i + 1], one), (seed, i)


def _head_model(shortlist: int, seed: int = 0):
    """A tiny-llama (vocab 512) with an int4 body and an int8 head, read in two passes
    when ``shortlist``."""
    from services.worker.engine.config import EngineConfig
    from services.worker.engine.model_runner import ModelRunner, resolve_model_config

    config = EngineConfig(model="tiny-llama", load_format="dummy", quantization="int4",
                          lm_head_shortlist=shortlist, seed=seed)
    return ModelRunner(config, resolve_model_config(config), num_blocks=4,
                       max_model_len=64).model


@needs_kernels
@pytest.mark.parametrize("size", [4, 16])  # 4: through block maxima (8 blocks of 64)
def test_a_shortlist_head_takes_the_int8_logits_of_its_coarse_top_tokens(size):
    from services.worker.engine.model.quant import ShortlistHead

    model, plain = _head_model(size), _head_model(0)
    head = model.w.lm_head
    assert isinstance(head, ShortlistHead) and head.size == size
    assert head.coarse.bits == 4 and head.exact is not None and head.exact.bits == 8
    assert torch.equal(head.exact.q, plain.w.lm_head.q)
    none = torch.empty(0)
    h = torch.randn(1, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    coarse = kernels.quantized_linear(h, head.coarse.q, head.coarse.scales,
                                      head.coarse.offsets).float()
    exact = kernels.quantized_linear(h, head.exact.q, head.exact.scales, none).float()
    top = coarse.topk(size).indices[0]
    logits = model._logits(h, row_exact=False)
    rest = torch.ones(512, dtype=torch.bool)
    rest[top] = False
    assert torch.equal(logits[0, top], exact[0, top])  # the shortlist: int8, bit for bit
    ceiling = torch.nextafter(exact[0, top].max(), torch.tensor(-math.inf))
    # the tail: the coarse pass, under the shortlist's highest
    assert torch.equal(logits[0, rest], torch.minimum(coarse[0, rest], ceiling))
    assert logits.argmax() == exact.argmax()
    # More rows than the decode kernels take, without row-exactness: the int8 head alone.
    many = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert torch.equal(model._logits(many, row_exact=False), plain._logits(many, row_exact=False))


def test_no_tail_token_outranks_the_shortlist():
    """The shortlist is picked for high coarse logits, so their int4 errors lean high:
    a tail token's coarse logit may beat their exact ones, and must not win."""
    from types import SimpleNamespace

    from services.worker.engine.model.llama import LlamaModel
    from services.worker.engine.model.quant import ShortlistHead

    v = 100
    coarse = torch.zeros(1, v)
    coarse[0, :4] = torch.tensor([10.0, 9.9, 9.8, 9.7])
    coarse[0, 50] = 9.0  # the tail's best
    exact = torch.zeros(1, v)
    exact[0, :4] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    coarse[0, 60] = 4.5  # beats some of the shortlist's exact logits: left as it is

    def row_ids(w: QuantizedWeight) -> torch.Tensor:
        return w.q[:, 0].long()

    def exact_linear(h, w):  # the coarse head or gathered exact rows (ids in q[:, 0])
        return coarse.clone() if w is head.coarse else exact[:, row_ids(w)]

    ids = torch.arange(v, dtype=torch.int8).view(v, 1)
    weight = QuantizedWeight(q=ids, scales=torch.ones(v, 1).half(), offsets=None,
                             group_size=1, dtype=torch.bfloat16)
    head = ShortlistHead(coarse=replace(weight), exact=weight, size=4)
    model = object.__new__(LlamaModel)
    model.ops = SimpleNamespace(exact_linear=exact_linear, linear=None)
    model.w = SimpleNamespace(lm_head=head)
    logits = model._logits(torch.zeros(1, 64), row_exact=False)
    below = torch.nextafter(torch.tensor(5.0), torch.tensor(-math.inf))
    assert logits[0, :4].tolist() == [5.0, 4.0, 3.0, 2.0]
    assert logits[0, 50] == below and logits.argmax() == 0 and logits[0, 60] == 4.5
    assert logits[0, 4:50].eq(0).all() and logits[0, 51:60].eq(0).all()
    assert logits[0, 61:].eq(0).all()


def test_a_head_too_narrow_for_int4_blocks_stays_int8():
    from services.worker.engine.model.quant import can_shortlist, quantize_int8, shortlist_head

    narrow = quantize_int8(weight(128, 96), 32)
    assert not can_shortlist(narrow)
    with pytest.raises(ValueError, match="no int4 copy of a head 96 wide"):
        shortlist_head(narrow, 8)


@needs_kernels
def test_a_shortlist_heads_rows_are_what_one_row_calls_give():
    # Speculative verification computes a request's drafts as rows of one call.
    model = _head_model(16)
    h = torch.randn(7, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    many = model._logits(h, row_exact=True)
    for i in range(7):
        assert torch.equal(many[i:i + 1], model._logits(h[i:i + 1], row_exact=True)), i


def test_the_fallback_linear_dequantizes():
    w = weight(16, 64)
    x = torch.randn(3, 64).to(torch.bfloat16)
    for qw in (quantize_int8(w), quantize_int4(w, 32)):
        expected = F.linear(x.float(), qw.dequantize().float())
        torch.testing.assert_close(linear(x, qw).float(), expected, rtol=2e-2, atol=2e-2)


def test_int4_from_the_gguf_blocks_is_the_gguf_exactly(model_dir, tmp_path):
    """SmolLM2's layer matmuls are Q4_1 in its GGUF; the store's fp32 checkpoint is their
    dequantization, so int4 taken from the blocks (Q and K rows put back in HF's order)
    must give it back exactly, where re-quantizing would round again."""
    cfg = load_model_config(model_dir)
    gguf = prebuilt._gguf_file(model_dir)
    assert gguf is not None
    blocks = prebuilt.gguf_q4_1_layers(gguf, cfg)
    assert blocks is not None and len(blocks) == 4 * cfg.num_layers
    for layer in (0, cfg.num_layers - 1):
        for name in prebuilt.MATMULS:
            got = blocks[f"layers.{layer}.{name}"]
            assert got.group_size == 32
            assert torch.equal(_dequant_fp32(got),
                               prebuilt._fp32_matmul(model_dir, layer, name))


def _dequant_fp32(w: QuantizedWeight) -> torch.Tensor:
    q = unpack_int4(w.q).float()
    n, k = q.shape
    assert w.offsets is not None
    return (q.view(n, k // 32, 32) * w.scales[..., None] + w.offsets[..., None]).view(n, k)


def test_a_prebuilt_file_is_built_once_and_loaded(model_dir, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.startswith("quant-"):
            os.symlink(f, folder / f.name)
    cfg = load_model_config(folder)
    out, source = prebuilt.build(folder, cfg, Quantization.INT4)
    assert (out.name, source) == ("quant-int4-g32-n64.safetensors", "gguf")
    loaded = prebuilt.load(folder, cfg, Quantization.INT4, None, dtype=torch.bfloat16,
                           device=torch.device("cpu"))
    assert loaded is not None and len(loaded) == 4 * cfg.num_layers + 1  # and the LM head
    assert torch.equal(_dequant_fp32(loaded["layers.3.gate_up"]),
                       prebuilt._fp32_matmul(folder, 3, "gate_up"))
    # The tied head from the GGUF's Q8_0 blocks: exactly the checkpoint's embedding.
    head = loaded["lm_head"]
    assert (head.bits, head.group_size) == (8, 32)
    in_fp32 = head.q.float().view(-1, 18, 32) * head.scales.float()[..., None]  # d * q
    assert torch.equal(in_fp32.view_as(head.q),
                       prebuilt._fp32_tensor(folder, "model.embed_tokens.weight"))
    # int8 has no GGUF blocks: quantized from the fp32 checkpoint.
    out, source = prebuilt.build(folder, cfg, Quantization.INT8)
    assert (out.name, source) == ("quant-int8-g64.safetensors", "fp32")  # the default
    out, _ = prebuilt.build(folder, cfg, Quantization.INT8, PER_CHANNEL)
    assert out.name == "quant-int8-gchannel.safetensors"
    per_channel = prebuilt.load(folder, cfg, Quantization.INT8, PER_CHANNEL,
                                dtype=torch.bfloat16, device=torch.device("cpu"))
    assert per_channel is not None and per_channel["layers.0.qkv"].group_size == cfg.hidden_size
    assert prebuilt.load(folder, cfg, Quantization.INT8, 192, dtype=torch.bfloat16,
                         device=torch.device("cpu")) is None  # not built for groups of 192
    shutil.rmtree(folder)


@pytest.mark.parametrize(("options", "message"), [
    ({"quantization": "int3"}, "quantization must be none, int8 or int4, got 'int3'"),
    ({"quantization": "int4", "quant_group_size": 48}, r"multiple of 32 \(0: int8 per output "
                                                       r"channel\), got 48"),
    ({"quantization": "int4", "quant_group_size": 0}, "int4 has no per-channel mode"),
    ({"quantization": "int4", "lm_head_shortlist": -1}, "lm_head_shortlist must be >= 0"),
])
def test_the_engine_config_refuses_an_unknown_quantization(options, message):
    from services.worker.engine.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **options)


def test_a_quantized_model_reads_fewer_bytes_per_token():
    from services.worker.engine.config import EngineConfig
    from services.worker.engine.model_runner import ModelRunner, resolve_model_config

    sizes = {}
    for mode in ("none", "int8", "int4"):
        config = EngineConfig(model="tiny-llama", load_format="dummy", quantization=mode)
        runner = ModelRunner(config, resolve_model_config(config), num_blocks=4,
                             max_model_len=64)
        sizes[mode] = runner.weight_bytes_per_token
    # tiny-llama: 2 layers of 36,864 matmul weights in 512 rows, a 512 x 64 tied head
    # (int8 in groups of 32 when quantized), 640 bytes of bf16 norms.
    # The head is read in two passes (ShortlistHead): int4 in groups of 32, and 64 of
    # its 512 rows again in int8.
    layers, head, norms = 2 * 36_864, 512 * 64, 640
    int8_head = head + head // 32 * 2
    # (Where the decode kernels cannot run, the int8 head alone.)
    two_pass_head = (head // 2 + head // 32 * 4 + int8_head * 64 // 512 if kernels is not None
                     else int8_head)
    assert sizes == {
        "none": 2 * (layers + head) + norms,
        "int8": layers + layers // 64 * 2 + two_pass_head + norms,  # an fp16 scale per 64
        "int4": layers // 2 + layers // 32 * 4 + two_pass_head + norms,  # scale + offset
    }
