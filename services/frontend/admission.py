"""Who may call, and what a call may spend: the tenant from the gateway's header, and the
tenant's token budget reserved before the worker runs.

Envoy maps the caller's API key to a tenant and stamps ``x-genmesh-tenant`` (dropping any
value a client sent; see ``gateway/routes.py``). With tenants configured, a call without
that header had no key, or an unknown one: UNAUTHENTICATED. With none configured (a bare
frontend in a test or behind another gateway), every call is the anonymous tenant "".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc

from genmesh.core import metadata
from services.frontend import metrics
from services.frontend.budget import (
    BudgetError,
    BudgetExceeded,
    BudgetPolicy,
    BudgetUnavailable,
    Reservation,
    TokenBudgets,
)
from services.frontend.errors import PipelineError


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    # Tenant name → tokens per minute (None: unlimited). Empty: no tenants, no auth.
    tenants: Mapping[str, int | None]
    api_key_header: str = "x-api-key"  # named in the error a caller without a key gets


class Admission:
    def __init__(self, policy: AdmissionPolicy, budgets: TokenBudgets | None) -> None:
        self.policy = policy
        self.budgets = budgets
        if budgets is not None:
            for tenant, limit in policy.tenants.items():
                if limit is not None:
                    metrics.BUDGET_LIMIT.labels(tenant).set(limit)

    def tenant(self, invocation_metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """The caller's tenant; PipelineError UNAUTHENTICATED when one is needed and absent."""
        if not self.policy.tenants:
            return ""
        name = str(dict(invocation_metadata or ()).get(metadata.TENANT, ""))
        if name not in self.policy.tenants:
            raise PipelineError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"missing or unknown API key: send your key in the "
                f"'{self.policy.api_key_header}' metadata (through the gateway)")
        return name

    def has_budget(self, tenant: str) -> bool:
        """Whether the tenant's requests reserve tokens before they run."""
        return self.budgets is not None and self.policy.tenants.get(tenant) is not None

    async def reserve(self, tenant: str, num_tokens: int) -> Reservation:
        """Take ``num_tokens`` (prompt + max_tokens) from the budget of a tenant that has
        one (``has_budget``). Raises PipelineError with the code the caller should see."""
        limit = self.policy.tenants.get(tenant)
        if limit is None or self.budgets is None:
            raise ValueError(f"tenant {tenant!r} has no token budget")
        try:
            return await self.budgets.reserve(tenant, num_tokens, BudgetPolicy(limit))
        except BudgetUnavailable as exc:
            raise PipelineError(grpc.StatusCode.UNAVAILABLE, exc.message) from None
        except BudgetError as exc:  # BudgetExceeded, RequestTooLarge
            metrics.BUDGET_REJECTIONS.labels(tenant).inc()
            if isinstance(exc, BudgetExceeded):
                raise PipelineError(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message,
                                    retry_after_s=exc.reset_in_s,
                                    rate_limit=(exc.limit, exc.num_free_tokens)) from None
            raise PipelineError(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message) from None
