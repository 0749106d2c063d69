"""Turn a step's logits into next tokens, one row per request, each with its own knobs.

Greedy rows take the argmax. Sampled rows apply repetition penalty, temperature,
top-k, top-p and min-p, then draw with the request's own generator (seeded from
``params.seed`` when given), so a seed reproduces a sequence whatever else shares
the batch.
"""

from __future__ import annotations

import random

import torch

from services.worker.engine.outputs import TokenLogprob
from services.worker.engine.request import Request

# Temperatures below this act as this: dividing by a tinier one overflows the logits
# to inf, softmax turns them into NaN, and argmax then returns an arbitrary token.
MIN_TEMPERATURE = 1e-5


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}  # request id -> its RNG

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, req: Request) -> torch.Generator:
        gen = self._generators.get(req.request_id)
        if gen is None:
            seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[req.request_id] = gen
        return gen

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, requests: list[Request]
               ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [S, V] fp32, row i for requests[i]. Returns token ids and logprobs."""
        num_rows = logits.shape[0]
        want_logprobs = [r.params.logprobs > 0 for r in requests]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        processed = logits
        penalized = [i for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
        if penalized:
            processed = logits.clone()
            for i in penalized:
                apply_repetition_penalty(processed[i], requests[i].all_ids,
                                         requests[i].params.repetition_penalty)

        tokens = processed.max(dim=-1).indices  # greedy for every row; sampled rows overwritten
        sampled_rows = [i for i, r in enumerate(requests) if not r.params.is_greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            probs = _filtered_probs(processed[rows], [requests[i] for i in sampled_rows])
            for j, i in enumerate(sampled_rows):
                # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p.
                gen = self._generator(requests[i])
                noise = torch.empty_like(probs[j]).exponential_(generator=gen)
                tokens[i] = (probs[j] / noise).argmax()

        token_list = tokens.tolist()
        out_logprobs: list[TokenLogprob | None] = [None] * num_rows
        if raw_logprobs is not None:
            for i, r in enumerate(requests):
                if not want_logprobs[i]:
                    continue
                top = raw_logprobs[i].topk(r.params.logprobs)
                out_logprobs[i] = TokenLogprob(
                    token_id=token_list[i],
                    logprob=float(raw_logprobs[i, token_list[i]]),
                    top=tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)),
                )
        return token_list, out_logprobs


def apply_repetition_penalty(row: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    """In place, as in the CTRL paper / HF: divide positive logits, multiply negative."""
    ids = torch.tensor(sorted(set(token_ids)), device=row.device)
    seen = row[ids]
    row[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)


def _filtered_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """[S, V] logits of sampled rows -> probabilities after temperature/top-k/top-p/min-p."""
    temps = torch.tensor([max(r.params.temperature, MIN_TEMPERATURE) for r in requests],
                         device=logits.device)
    logits = logits / temps.unsqueeze(1)
    top_ks = [r.params.top_k for r in requests]
    if any(k > 0 for k in top_ks):
        vocab = logits.shape[1]
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=logits.device)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top_ps = [r.params.top_p for r in requests]
    if any(p < 1.0 for p in top_ps):
        p = torch.tensor(top_ps, device=logits.device).unsqueeze(1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass *before* it is below p (the top token always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill((mass_before >= p) & (p < 1.0), 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    min_ps = [r.params.min_p for r in requests]
    if any(m > 0.0 for m in min_ps):
        m = torch.tensor(min_ps, device=logits.device).unsqueeze(1)
        probs = probs.masked_fill(probs < m * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)
