"""Micro-batches prompt checks. One thread runs them; the checks that wait while it is
busy run together next, so the windows of all their prompts share one embedding call
(per ~15-token text, all-MiniLM-L6-v2 on one CPU thread costs ~5 ms alone, ~1 ms in a
batch of 32). There is no timer: a check that finds the thread idle runs at once, alone.

A batch takes the waiting checks in arrival order, running each one's rule scanners,
while it holds fewer than ``max_batch_prompts`` prompts and ``max_batch_windows`` texts to
embed (the last prompt taken may pass that by its own few) and, beyond its first prompt,
at most ``max_batch_chars`` characters: the rules cost ~1.6 ms per 1,000 characters, so a
huge prompt runs in a batch of its own instead of holding up the short ones with it. A
prompt with nothing to embed (a rule settled it, or its policy has no embedding) is
answered as soon as its rules ran.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

from services.safety import metrics
from services.safety.checker import Decision, PromptChecker, RuleScan
from services.safety.policy import TenantPolicy

log = logging.getLogger("genmesh.safety")


class CheckerClosedError(RuntimeError):
    """The batcher was closed (the service is shutting down) before the check ran."""


@dataclass(frozen=True, slots=True)
class _Check:
    text: str
    policy: TenantPolicy
    scope: str  # whose text (the tenant): cached scores are kept per scope
    future: Future[Decision]  # cancelled by the caller, or set by the batcher's thread


class CheckBatcher:
    """Owns the queue of waiting prompt checks and the one thread that runs them (the
    only thread that touches the checker: the embedding model already uses every CPU
    thread torch is given)."""

    def __init__(self, checker: PromptChecker, *, max_batch_prompts: int = 32,
                 max_batch_windows: int = 32, max_batch_chars: int = 16_384) -> None:
        self.checker = checker
        self.max_batch_prompts = max_batch_prompts
        self.max_batch_windows = max_batch_windows
        self.max_batch_chars = max_batch_chars
        self._waiting: deque[_Check] = deque()  # guarded by _cond
        self._cond = threading.Condition()
        self._is_closed = False  # guarded by _cond
        self._thread = threading.Thread(target=self._run, name="safety-check", daemon=True)
        self._thread.start()

    def submit(self, text: str, policy: TenantPolicy, *, scope: str = "") -> Future[Decision]:
        """Queues a check of ``text`` (``scope``: whose it is, the tenant); cancelling the
        future before the check starts drops it. Raises CheckerClosedError after
        ``close``."""
        future: Future[Decision] = Future()
        with self._cond:
            if self._is_closed:
                raise CheckerClosedError("the safety checker is shut down; the prompt was "
                                         "not checked")
            self._waiting.append(_Check(text, policy, scope, future))
            self._cond.notify()
        return future

    def close(self, *, timeout_s: float = 5.0) -> None:
        """Fails every waiting check with CheckerClosedError, and waits up to
        ``timeout_s`` for the batch running now to finish and the thread to stop."""
        with self._cond:
            self._is_closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cond.notify()
        for check in waiting:
            if check.future.set_running_or_notify_cancel():
                check.future.set_exception(CheckerClosedError(
                    "the safety service is shutting down; the prompt was not checked"))
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the prompt check thread did not stop in time",
                        extra={"timeout_s": timeout_s})

    def _run(self) -> None:
        while True:
            with self._cond:
                # No timeout needed: submit and close both notify.
                self._cond.wait_for(lambda: self._waiting or self._is_closed)
                if self._is_closed:
                    return
            try:
                self._run_batch()
            except Exception:  # a bug here must not stop every later check
                log.exception("prompt check batch failed")

    def _take(self, *, num_chars: int, is_first: bool) -> _Check | None:
        """The next waiting check if the batch has room for its text, else None."""
        with self._cond:
            if not self._waiting:
                return None
            if not is_first and num_chars + len(self._waiting[0].text) > self.max_batch_chars:
                return None
            return self._waiting.popleft()

    def _run_batch(self) -> None:
        to_embed: list[tuple[_Check, RuleScan]] = []
        num_prompts = num_windows = num_chars = 0
        while num_prompts < self.max_batch_prompts and num_windows < self.max_batch_windows:
            check = self._take(num_chars=num_chars, is_first=num_prompts == 0)
            if check is None:
                break
            if not check.future.set_running_or_notify_cancel():
                continue  # the caller gave up (deadline, disconnect) before it ran
            num_prompts += 1
            num_chars += len(check.text)
            try:
                scan = self.checker.scan(check.text, check.policy, scope=check.scope)
            except Exception as exc:
                check.future.set_exception(exc)
                continue
            if scan.embedding_texts is None:
                self._decide([(check, scan)])  # nothing to embed: no reason to wait
            else:
                to_embed.append((check, scan))
                num_windows += len(scan.embedding_texts)
        if num_prompts:
            metrics.CHECK_BATCH_PROMPTS.observe(num_prompts)
            metrics.CHECK_BATCH_WINDOWS.observe(num_windows)
        if to_embed:
            self._decide(to_embed)

    def _decide(self, scanned: list[tuple[_Check, RuleScan]]) -> None:
        try:
            decisions = self.checker.check_many([scan for _, scan in scanned])
        except Exception as exc:
            if len(scanned) == 1:
                scanned[0][0].future.set_exception(exc)
                return
            # One prompt's texts may have broken the batch: one by one, only it fails.
            log.warning("batched prompt check failed; checking its prompts one by one",
                        extra={"prompts": len(scanned), "error": repr(exc)})
            for item in scanned:
                self._decide([item])
            return
        for (check, _), decision in zip(scanned, decisions, strict=True):
            check.future.set_result(decision)
