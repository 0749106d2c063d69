"""The safety service's core: picks the tenant's policy, runs the prompt checker or a
stream moderator, and writes the audit records. The servicer only translates protos.

The policy file is reloaded when it changes (checked at most once a second); a file
that no longer parses keeps the last good policy and logs why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from services.safety import metrics
from services.safety import policy as policies
from services.safety.audit import AuditLog, AuditRecord
from services.safety.batcher import CheckBatcher
from services.safety.checker import Decision, Finding, PromptChecker
from services.safety.policy import Action, PolicySet, TenantPolicy
from services.safety.stream import Release, StreamModerator

log = logging.getLogger("genmesh.safety")


class UnknownTenantError(LookupError):
    """The policy requires every tenant to have an entry, and this one has none."""


def audit_records(findings: tuple[Finding, ...], *, request_id: str, tenant: str,
                  direction: str) -> list[AuditRecord]:
    now = time.time()
    if not findings:
        return [AuditRecord(now, request_id, tenant, direction, "none", Action.ALLOW.value,
                            "", 0.0)]
    return [AuditRecord(now, request_id, tenant, direction, f.category, f.action.value,
                        f.scanner, f.score, f.family) for f in findings]


def _record(audit: AuditLog, records: list[AuditRecord]) -> None:
    """Every decision is counted (Prometheus) and audited."""
    metrics.count_decisions(records)
    audit.record(records)


class PolicyFile:
    """Owns the loaded policy set and reloads it when the file changes."""

    def __init__(self, path: Path, *, check_every_s: float = 1.0) -> None:
        self.path = path
        self.check_every_s = check_every_s
        self.policies = policies.load(path)
        self._mtime = path.stat().st_mtime_ns
        self._checked = time.monotonic()

    def current(self) -> PolicySet:
        now = time.monotonic()
        if now - self._checked >= self.check_every_s:
            self._checked = now
            try:
                mtime = self.path.stat().st_mtime_ns
                if mtime != self._mtime:
                    self._mtime = mtime
                    self.policies = policies.load(self.path)
                    log.info("policy reloaded", extra={"path": str(self.path)})
            except (OSError, policies.PolicyError) as exc:
                log.error("policy not reloaded; keeping the last good one",
                          extra={"path": str(self.path), "error": str(exc)})
        return self.policies


@dataclass(slots=True)
class ModerationStream:
    """One Moderate stream: the moderator plus what its audit records need."""

    moderator: StreamModerator
    request_id: str
    tenant: str
    audit: AuditLog
    num_findings: int = 0

    def feed(self, text: str) -> Release:
        return self._audited(self.moderator.feed(text))

    def flush(self, text: str = "") -> Release:
        release = self._audited(self.moderator.flush(text))
        if self.num_findings == 0:  # a clean stream still leaves its record
            _record(self.audit, audit_records((), request_id=self.request_id,
                                                  tenant=self.tenant, direction="output"))
        return release

    def _audited(self, release: Release) -> Release:
        if release.findings:
            self.num_findings += len(release.findings)
            _record(self.audit, audit_records(release.findings,
                                                  request_id=self.request_id,
                                                  tenant=self.tenant, direction="output"))
        return release


class Guard:
    def __init__(self, policy_file: PolicyFile, checker: PromptChecker, audit: AuditLog, *,
                 max_hold_chars: int = 256, check_timeout_s: float = 30.0) -> None:
        self.policy_file = policy_file
        self.audit = audit
        self.max_hold_chars = max_hold_chars
        # Longest a prompt check may wait and run (a backstop: a queue of 32 short
        # prompts clears in well under a second).
        self.check_timeout_s = check_timeout_s
        # The checks run off the event loop (free for streams meanwhile), batched.
        self.batcher = CheckBatcher(checker)

    def policy(self, tenant: str) -> TenantPolicy:
        found = self.policy_file.current().for_tenant(tenant)
        if found is None:
            raise UnknownTenantError(f"no safety policy for tenant {tenant!r}; add one to "
                                     f"{self.policy_file.path.name}")
        return found

    async def check_prompt(self, *, request_id: str, tenant: str, text: str) -> Decision:
        policy = self.policy(tenant)
        decision = await asyncio.wait_for(
            asyncio.wrap_future(self.batcher.submit(text, policy, scope=tenant)),
            self.check_timeout_s)
        _record(self.audit, audit_records(decision.findings, request_id=request_id,
                                        tenant=tenant, direction="prompt"))
        return decision

    def open_stream(self, *, request_id: str, tenant: str) -> ModerationStream:
        moderator = StreamModerator(self.policy(tenant), max_hold_chars=self.max_hold_chars)
        return ModerationStream(moderator, request_id, tenant, self.audit)

    async def close(self) -> None:
        """Fails the prompt checks still waiting (CheckerClosedError), then flushes the
        audit log."""
        await asyncio.to_thread(self.batcher.close)
        await self.audit.close()
