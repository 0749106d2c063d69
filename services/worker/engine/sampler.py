"""Turn a step's logits into next tokens, one row per request, in a fixed number of
batched tensor ops whatever the batch's mix.

The logits first go through logits_processors.py (logit bias, min-tokens, penalties, a
grammar's token mask). Greedy rows then take the argmax of the processed logits. Sampled rows apply
temperature, top-k, top-p and min-p as batched masks, then race exponential clocks:
argmax_j p_j / E_j with E_j ~ Exp(1) draws j with probability p_j. The clocks come from
a counter-based generator: a hash of (seed, number of output tokens so far, token id)
done in integer tensor ops on the logits' device. So the draw for output position n of
a request is fixed by its seed and n alone, whatever else shares the batch and
whichever row it is, and no generator state lives between steps.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from services.worker.engine.logits_processors import TokenBitmask, process_logits, to_device
from services.worker.engine.outputs import TokenLogprob
from services.worker.engine.request import Request

# Temperatures below this act as this: dividing by a tinier one overflows the logits
# to inf, softmax turns them into NaN, and argmax then returns an arbitrary token.
MIN_TEMPERATURE = 1e-5

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
# The largest float32 below 1: (x + 0.5) * 2^-32 rounds up to 1.0 for the top x values.
_MAX_UNIFORM = 1.0 - 2.0**-24


class Sampler:
    def __init__(self, device: torch.device, *, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.device = device
        self.eos_token_ids = eos_token_ids  # the model's end tokens (banned before min_tokens)
        self._unseeded: dict[str, int] = {}  # request id -> seed drawn for a seed=None request

    def release(self, request_id: str) -> None:
        self._unseeded.pop(request_id, None)

    def _seed(self, req: Request) -> int:
        if req.params.seed is not None:
            return req.params.seed
        seed = self._unseeded.get(req.request_id)
        if seed is None:
            seed = self._unseeded[req.request_id] = random.getrandbits(63)
        return seed

    def sample(self, logits: torch.Tensor, requests: list[Request], *,
               bitmask: TokenBitmask | None = None
               ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [S, V] fp32, row i for requests[i]. Returns token ids and logprobs."""
        return self.launch(logits, requests, bitmask=bitmask).read()

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, requests: list[Request], *,
               bitmask: TokenBitmask | None = None) -> SampledTokens:
        """Queue one step's sampling on the logits' device; nothing is read back.

        logits: [S, V] fp32, row i for requests[i]; ``bitmask``: the tokens the
        constrained rows may take. A request's draw is number len(output_ids) of its
        seed, so a placeholder for a token still in flight counts.
        """
        processed = process_logits(logits, requests, eos_token_ids=self.eos_token_ids,
                                   bitmask=bitmask)
        tokens = self._draw(processed, requests, [len(r.output_ids) for r in requests])
        return SampledTokens.of(logits, tokens, [r.params.logprobs for r in requests])

    @torch.inference_mode()
    def launch_verify(self, logits: torch.Tensor, requests: list[Request],
                      drafts: list[tuple[int, ...]], *,
                      bitmask: TokenBitmask | None = None) -> SampledTokens:
        """Queue speculative verification: request i has ``1 + len(drafts[i])`` rows of
        logits, its last known token's then each draft's. Row j of a request is drawn as
        plain decoding draws position len(output_ids) + j (greedy: the argmax; sampled:
        draw number len(output_ids) + j of its seed), and accepts its draft when the
        draw is the draft; the last row's draw is the bonus token. ``read_verified``
        tells which rows accepted.

        Both proposers propose one token (a point mass), for which this is rejection
        sampling exactly: a draft d is accepted with probability p(d), and otherwise the
        draw is distributed as p without d. It also keeps the output what plain
        decoding with the same seed gives, whether or how much a step speculated.
        Requests with drafts must not read their output (SamplingParams.can_speculate);
        those without (one row) may, and ``bitmask`` rows are request indices."""
        rows_requests = [r for r, d in zip(requests, drafts, strict=True)
                         for _ in range(len(d) + 1)]
        counters = [len(r.output_ids) + j for r, d in zip(requests, drafts, strict=True)
                    for j in range(len(d) + 1)]
        # The draft each row checks: the one after its input token; -1 for the bonus row.
        checked = to_device([t for d in drafts for t in (*d, -1)], torch.int64, logits.device)
        if bitmask is not None:
            first_row = [0]
            for d in drafts:
                first_row.append(first_row[-1] + len(d) + 1)
            bitmask = TokenBitmask(rows=[first_row[i] for i in bitmask.rows], bits=bitmask.bits)
        processed = process_logits(logits, rows_requests, eos_token_ids=self.eos_token_ids,
                                   bitmask=bitmask)
        tokens = self._draw(processed, rows_requests, counters)
        return SampledTokens.of(logits, tokens, [r.params.logprobs for r in rows_requests],
                                accepted=tokens == checked)

    def _draw(self, processed: torch.Tensor, requests: list[Request], counters: list[int]
              ) -> torch.Tensor:
        """[S] tokens of processed logits [S, V]: the argmax of greedy rows, draw number
        counters[i] of its request's seed for a sampled row i."""
        tokens = processed.argmax(dim=-1)  # greedy for every row, sampled rows overwritten
        sampled = [i for i, r in enumerate(requests) if not r.params.is_greedy]
        if not sampled:
            return tokens
        rows_requests = [requests[i] for i in sampled]
        tensors = SamplingTensors.of(rows_requests, [self._seed(r) for r in rows_requests],
                                     processed.device, counters=[counters[i] for i in sampled])
        if len(sampled) == len(requests):
            return _sample_rows(processed, tensors)
        rows = to_device(sampled, torch.int64, processed.device)
        tokens[rows] = _sample_rows(processed[rows], tensors)
        return tokens


@dataclass(frozen=True, slots=True)
class SampledTokens:
    """One step's sampled tokens (and asked-for logprobs), on the device until read."""

    token_ids: torch.Tensor  # [S] int64 on the device
    # [S (+ S) + W * (1 + 2 * max_n)] fp64: token ids, the accepted flags of a
    # verification, then the W rows' logprobs
    packed: torch.Tensor
    num_logprobs: list[int]  # per row, the number of top alternatives asked (0 = none)
    verifies: bool = False  # packed holds accepted flags (Sampler.launch_verify)

    @staticmethod
    def of(logits: torch.Tensor, tokens: torch.Tensor, num_logprobs: list[int], *,
           accepted: torch.Tensor | None = None) -> SampledTokens:
        """Gather the raw (unpenalized) logprobs of the rows that ask for them next to
        the tokens (and a verification's accepted flags), so that reading them all is
        one copy from the device."""
        head = tokens if accepted is None else torch.cat([tokens, accepted.long()])
        verifies = accepted is not None
        want = [i for i, n in enumerate(num_logprobs) if n > 0]
        if not want:
            return SampledTokens(token_ids=tokens, packed=head, num_logprobs=num_logprobs,
                                 verifies=verifies)
        if len(want) == len(num_logprobs):
            rows_logits, rows_tokens = logits, tokens
        else:
            rows = to_device(want, torch.int64, logits.device)
            rows_logits, rows_tokens = logits[rows], tokens[rows]
        raw = torch.log_softmax(rows_logits, dim=-1)  # [W, V]
        top = raw.topk(max(num_logprobs), dim=-1)  # [W, max_n] each
        chosen = raw.gather(1, rows_tokens.unsqueeze(1))  # [W, 1]
        # fp64 holds the ids and the fp32 logprobs exactly.
        packed = torch.cat([head.double(), chosen.double().flatten(),
                            top.indices.double().flatten(), top.values.double().flatten()])
        return SampledTokens(token_ids=tokens, packed=packed, num_logprobs=num_logprobs,
                             verifies=verifies)

    def read(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """The token ids and logprobs on the host: the step's one wait for the device."""
        token_ids, logprobs, _ = self.read_verified()
        return token_ids, logprobs

    def read_verified(self) -> tuple[list[int], list[TokenLogprob | None], list[bool]]:
        """``read``, and per row whether it accepted its draft (all False when this is
        no verification)."""
        flat = self.packed.tolist()
        num_rows = len(self.num_logprobs)
        token_ids = [int(t) for t in flat[:num_rows]]
        accepted = [False] * num_rows
        if self.verifies:
            accepted = [t != 0 for t in flat[num_rows:2 * num_rows]]
            flat = flat[num_rows:]
        out: list[TokenLogprob | None] = [None] * num_rows
        want = [i for i, n in enumerate(self.num_logprobs) if n > 0]
        if not want:
            return token_ids, out, accepted
        max_n, num_want = max(self.num_logprobs), len(want)
        chosen = flat[num_rows:num_rows + num_want]
        top_ids = flat[num_rows + num_want:num_rows + num_want * (1 + max_n)]
        top_lps = flat[num_rows + num_want * (1 + max_n):]
        for w, i in enumerate(want):
            start, n = w * max_n, self.num_logprobs[i]
            top = zip((int(t) for t in top_ids[start:start + n]), top_lps[start:start + n],
                      strict=True)
            out[i] = TokenLogprob(token_id=token_ids[i], logprob=chosen[w], top=tuple(top))
        return token_ids, out, accepted


@dataclass(frozen=True, slots=True)
class SamplingTensors:
    """The sampled rows' parameters as device tensors, one row each (R rows)."""

    temperatures: torch.Tensor  # [R, 1] fp32, at least MIN_TEMPERATURE
    top_ks: torch.Tensor | None  # [R, 1] int64, 0 = off; None when no row uses top-k
    max_top_k: int  # the largest top_k asked (0 when none)
    top_p_rows: torch.Tensor | None  # [Rp] int64 rows with top_p < 1; None if none or all
    top_ps: torch.Tensor | None  # [Rp, 1] fp32 those rows' top_p; None when no row uses it
    log_min_ps: torch.Tensor | None  # [R, 1] fp32 log(min_p), -inf when off; None if unused
    keys: torch.Tensor  # [R, 2] int64: the two 32-bit halves of draw_key(seed, counter)

    @staticmethod
    def of(requests: list[Request], seeds: list[int], device: torch.device, *,
           counters: list[int] | None = None) -> SamplingTensors:
        """seeds[i] is requests[i]'s seed; its counter (the draw number) is its number of
        output tokens, or counters[i]."""
        params = [r.params for r in requests]
        if counters is None:
            counters = [len(r.output_ids) for r in requests]
        keys = [draw_key(seed, n) for n, seed in zip(counters, seeds, strict=True)]
        nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
        # Two host-to-device copies: R rows of per-row knobs, then one row per top-p row.
        floats = to_device(
            [[max(p.temperature, MIN_TEMPERATURE),
              math.log(p.min_p) if p.min_p > 0.0 else -math.inf] for p in params]
            + [[params[i].top_p, 0.0] for i in nucleus], torch.float32, device)
        ints = to_device([[p.top_k, k & _MASK32, k >> 32] for p, k in zip(params, keys,
                                                                           strict=True)]
                         + [[i, 0, 0] for i in nucleus], torch.int64, device)
        num_rows = len(requests)
        max_top_k = max(p.top_k for p in params)
        return SamplingTensors(
            temperatures=floats[:num_rows, 0:1],
            top_ks=ints[:num_rows, 0:1] if max_top_k > 0 else None,
            max_top_k=max_top_k,
            top_p_rows=ints[num_rows:, 0] if 0 < len(nucleus) < num_rows else None,
            top_ps=floats[num_rows:, 0:1] if nucleus else None,
            log_min_ps=floats[:num_rows, 1:2] if any(p.min_p > 0.0 for p in params) else None,
            keys=ints[:num_rows, 1:3])


def _sample_rows(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    """[R, V] processed logits of sampled rows -> [R] drawn token ids."""
    scaled = filter_logits(logits, tensors)
    token_ids = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)  # [1, V]
    # argmax p / E = argmax log p - log E, E = -log(1 - u): small u, the likely winners'
    # clocks, keep full float32 resolution where 1 - u would round.
    u = uniforms(tensors.keys, token_ids)
    return scaled.sub_(torch.log1p(u.neg_()).neg_().log_()).argmax(dim=-1)


def filter_logits(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    """[R, V] logits -> [R, V] log p up to a per-row constant, -inf where dropped.

    Applies temperature, then top-k, top-p and min-p as masks, as batched ops; a row's
    values depend on its own logits and knobs only. Top-k takes the k-th value from one
    topk of the largest k; top-p sorts the probabilities of only the rows that use it
    (one sort at most); min-p compares logits, no softmax.
    """
    vocab = logits.shape[1]
    # Top logit at 0: the noise added later keeps its resolution near the winners.
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / tensors.temperatures
    drop: torch.Tensor | None = None  # [R, V] bool
    if tensors.top_ks is not None:
        k = tensors.top_ks.clamp(min=1, max=vocab)  # a row with k = 0 drops nothing anyway
        kth = scaled.topk(min(tensors.max_top_k, vocab), dim=-1).values.gather(1, k - 1)
        # Ties with the k-th logit stay, so a row may keep more than k tokens.
        drop = (scaled < kth) & (tensors.top_ks > 0)
    if tensors.top_ps is not None:
        rows = tensors.top_p_rows
        sub = scaled if rows is None else scaled[rows]  # [Rp, V]
        if drop is not None:
            sub = sub.masked_fill(drop if rows is None else drop[rows], -math.inf)
        # Ties in probability: the lower token id comes first.
        sorted_probs, order = torch.softmax(sub, dim=-1).sort(dim=-1, descending=True,
                                                              stable=True)
        # Keep a token while the mass *before* it is below p (the top token always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        cut_sorted = mass_before >= tensors.top_ps
        cut = torch.zeros_like(cut_sorted).scatter_(1, order, cut_sorted)  # [Rp, V]
        if rows is None:
            drop = cut if drop is None else drop | cut
        else:
            if drop is None:
                drop = torch.zeros_like(scaled, dtype=torch.bool)
            drop[rows] |= cut
    if tensors.log_min_ps is not None:
        # p_j < min_p * p_max  <=>  scaled_j - scaled_max < log(min_p), and scaled_max = 0.
        low = scaled < tensors.log_min_ps
        drop = low if drop is None else drop | low
    if drop is not None:
        scaled = scaled.masked_fill(drop, -math.inf)
    return scaled


def draw_key(seed: int, counter: int) -> int:
    """The 64-bit key of draw number ``counter`` of ``seed``: splitmix64's counter-th output."""
    z = (seed + (counter + 1) * _GOLDEN64) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniforms(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """keys: [R, 2] int64 (32-bit halves of draw_key), token_ids: [R or 1, V] int64 ->
    [R, V] fp32 uniforms in (0, 1), one per (key, token id).

    Two keyed rounds of a 32-bit mixer, each a bijection of [0, 2^32), so a row's values
    are distinct before the float rounding. Integer math stays exact in int64 (products
    are below 2^63, see _mul32), so CPU and CUDA compute the same bits.
    """
    x = (token_ids + keys[:, 0:1]).bitwise_and_(_MASK32)
    x = _mix32(x).bitwise_xor_(keys[:, 1:2])
    x = _mix32(x)
    return x.to(torch.float32).add_(0.5).mul_(2.0**-32).clamp_(max=_MAX_UNIFORM)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """In place on x (values in [0, 2^32)): the lowbias32 finalizer (C. Wellons)."""
    x.bitwise_xor_(x >> 16)
    _mul32(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    _mul32(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def _mul32(x: torch.Tensor, factor: int) -> torch.Tensor:
    """In place: x * factor mod 2^32 for x in [0, 2^32). The factor is taken as its signed
    32-bit twin (same residue mod 2^32), so |product| < 2^63 never overflows int64, and
    the two's-complement mask keeps the low 32 bits."""
    signed = factor - (1 << 32) if factor >= 1 << 31 else factor
    return x.mul_(signed).bitwise_and_(_MASK32)
