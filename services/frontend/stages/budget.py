"""The budget stage: a tenant's prompt + max_tokens (for each of n choices) are reserved
from its token budget before the worker runs (``budget.py``: atomic in Redis, never
overshooting), and on the way out, however the request ended, the reservation is settled:
what the request did not use (by the request's token count) is refunded.

Absent from a chain without a budget store; a tenant without a budget skips the stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from genmesh.core.sampling import DEFAULT_MAX_TOKENS
from services.frontend import metrics
from services.frontend.admission import Admission
from services.frontend.stages.call import Call, Next, StageEvent


class ReserveBudget:
    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def run(self, call: Call, rest: Next) -> AsyncGenerator[StageEvent, None]:
        if not self.admission.has_budget(call.req.tenant):
            return rest(call)
        return self._reserved(call, rest)

    async def _reserved(self, call: Call, rest: Next) -> AsyncGenerator[StageEvent, None]:
        tenant = call.req.tenant
        # A negative max_tokens is refused by the worker (INVALID_ARGUMENT), after which
        # the reservation is refunded.
        max_tokens = max(call.req.params.max_tokens or DEFAULT_MAX_TOKENS, 0)
        with call.observer.stage("budget"):
            # The prompt once (as its usage counts it), every choice's tokens.
            reservation = await self.admission.reserve(
                tenant, call.tokens.num_prompt + call.req.n * max_tokens)
        try:
            async with contextlib.aclosing(rest(call)) as events:
                async for event in events:
                    yield event
        finally:
            num_used = call.tokens.num_total
            await reservation.settle(num_used)
            if reservation.is_reserved:
                metrics.BUDGET_USED.labels(tenant).inc(num_used)
