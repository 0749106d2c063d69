"""How many tokens a reply to the caller carries: the worker's stream interval.

Every reply costs the same Python and protobuf work in every hop after the worker
(Envoy's two listeners, the frontend's detokenizer, stop strings and moderation, the
client), whatever its size; under load that per-message work, not the tokens, is what
the mesh pays for (measured on 2 cores at 32 streams: a reply per token cost the mesh
0.67 CPU-ms per token beside 2.8 for the engine). So, as SGLang's and vLLM's
``stream_interval`` do, a stream's tokens are held and sent several at a time, and here
the interval follows the load: with ``n`` requests running it is ``ceil(n /
replies_per_step)`` tokens (at most ``max_interval``), so a step's tokens leave the
worker in about ``replies_per_step`` replies whatever the batch: the mesh's cost per step
stops growing with the batch. Held tokens are bounded in time too, and nothing waits:

- in the first reply of a stream (time to first token is what users feel most), and the
  second carries at most two tokens: what users see first is text, and the first text
  needs the tokens after the first one (the frontend's moderation holds a trailing word
  back until a later token ends it: it could still become an e-mail address), so a
  second reply held for a whole interval held the first words with it; the first three
  tokens end the first word of most answers ("I", "'m", " here"),
- in the last (finish reason, usage),
- while fewer than ``min_batch`` requests are running (a lightly loaded engine has the
  time to spare, and each token's latency is then what matters).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from services.worker.engine.outputs import Delta


@dataclass(frozen=True, slots=True)
class StreamInterval:
    """The policy; ``max_interval=1`` sends every step's tokens at once (no holding)."""

    max_interval: int = 16  # most tokens per reply
    replies_per_step: int = 4  # under load, a step's tokens leave in about this many replies
    min_batch: int = 8  # running requests from which tokens are held
    max_hold_ms: float = 250.0  # a held token goes out with the first step after this

    def __post_init__(self) -> None:
        if self.max_interval < 1:
            raise ValueError(f"stream interval must be at least 1, got {self.max_interval}")
        if self.replies_per_step < 1:
            raise ValueError(f"stream interval replies per step must be at least 1, got "
                             f"{self.replies_per_step}")
        if self.min_batch < 1:
            raise ValueError(f"stream interval min batch must be at least 1, got "
                             f"{self.min_batch}")
        if self.max_hold_ms < 0:
            raise ValueError(f"stream interval max hold must be >= 0 ms, got "
                             f"{self.max_hold_ms}")

    def interval(self, num_running: int) -> int:
        """Tokens per reply with ``num_running`` requests in the engine."""
        if num_running < self.min_batch:
            return 1
        return min(self.max_interval, -(-num_running // self.replies_per_step))


class ReplyGate:
    """One stream's side of the policy: fed the deltas as they arrive, says when the
    ones held so far should go out as one reply."""

    def __init__(self, policy: StreamInterval, num_running: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._num_running = num_running
        self._clock = clock
        self._held: list[Delta] = []
        self._held_tokens = 0
        self._held_since = 0.0
        self._num_replies = 0

    def add(self, deltas: list[Delta]) -> list[Delta] | None:
        """Take newly arrived deltas; returns every delta held so far when they are due
        (they then leave the gate), else None (hold them for a later step)."""
        if not self._held:
            self._held_since = self._clock()
        self._held += deltas
        self._held_tokens += sum(len(d.new_token_ids) for d in deltas)
        if not self._is_due():
            return None
        out, self._held, self._held_tokens = self._held, [], 0
        self._num_replies += 1
        return out

    def _is_due(self) -> bool:
        p = self._policy
        if self._num_replies == 0 or self._held[-1].finished:
            return True
        interval = p.interval(self._num_running())
        if self._num_replies == 1:  # the second reply: the first word's end, soon
            interval = min(interval, 2)
        return (self._held_tokens >= interval
                or (self._clock() - self._held_since) * 1000.0 >= p.max_hold_ms)
