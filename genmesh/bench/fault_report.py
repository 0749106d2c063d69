"""What clients saw when one process of the mesh was killed, judged against issue 19's
targets, and the table of it. Pure: call records and times in, rows and text out.

Per kill, every call of the load is one of:
- *in flight*: started before the kill, ended after it;
- *during the outage*: started after the kill, before the mesh served normally again;
- a *bystander* (either of the above): a call that does not need the killed process
  (``is_bystander``) and so must succeed.
A call that needs the killed process may still succeed (it had no more use for it); if
it fails, it must fail with UNAVAILABLE (retryable) within ``MAX_END_S``: of the kill
when its output was streaming at the kill (it was on every process of the path), else
of its own start (during the outage). A call in flight whose output had not begun (a
unary call, a stream queued at a busy worker) fails when it reaches the dead process,
which may be later: its code is judged, and its end shown apart (``max_waiting_end_s``).
Processes whose outage the mesh rides out by configuration (``FAILS_OPEN``) have only
bystanders: every call must succeed.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_END_S = 1.0  # a failed call ends this soon after the kill (or its own start)
MAX_RECOVERY_S = 3.0  # the mesh serves normally again this soon after the kill
# A process that loads a model when it starts (a worker): its load time (start to
# serving) plus this.
LOAD_RECOVERY_MARGIN_S = 2.0
MAX_BAD_LINES = 5  # calls listed per row under the table

OK, UNAVAILABLE = "OK", "UNAVAILABLE"
# Cache, Redis, rate limit: answers are served while they are down (uncached, limits
# admitted: ``global_failure_mode: open``). The load's tenant has no token budget, whose
# store is Redis and which refuses while Redis is down (``budget_failure_mode: closed``).
FAILS_OPEN = frozenset({"cache", "redis", "ratelimit"})


class CallKind(enum.StrEnum):
    """The calls of the fault load."""

    STREAM = "stream"  # GenerateStream past the response cache: every process
    CACHED = "cached"  # Generate answered from the response cache (no worker needed)
    PROBE = "probe"  # a one-token Generate past the cache, to tell when the mesh is back


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One call through the edge; times are monotonic seconds."""

    kind: CallKind
    started_at: float
    ended_at: float
    code: str  # the status code's name as the genmesh SDK reports it, "OK" for a success
    details: str = ""  # the status message of a failure
    first_token_at: float | None = None  # its first streamed text; None: none came
    # The code on the wire when the SDK reports another (a stream Envoy reset because its
    # frontend died: INTERNAL on the wire, UNAVAILABLE in the SDK); "" when the same.
    wire_code: str = ""


def loads_a_model(process: str) -> bool:
    """A worker: the issue's bar is its model-load time plus 2 s. Safety loads a small
    embedding model in about a second (services/safety/minilm.py) and is held to 3 s."""
    return process.startswith("worker")


def is_bystander(call: CallRecord, process: str, killed_at: float) -> bool:
    """Whether ``call`` can succeed without ``process``: any call when the mesh fails
    open for it; a stream already generating without the tokenizer (prompts are
    tokenized once, text is detokenized in the frontend); a cached answer without the
    worker (its key names the version the split reached last, stages/generate.py).
    Safety (closed by configuration) and the frontend have none."""
    if process in FAILS_OPEN:
        return True
    if process.startswith("worker"):
        return call.kind is CallKind.CACHED
    if process == "tokenizer":
        return call.first_token_at is not None and call.first_token_at < killed_at
    return False


@dataclass(frozen=True, slots=True)
class FaultRow:
    """One kill, as the table shows it."""

    process: str
    in_flight_codes: dict[str, int]  # status code -> calls in flight at the kill
    max_failed_end_s: float | None  # latest end after the kill of a failed call streaming then
    outage_codes: dict[str, int]  # status code -> calls started during the outage
    max_outage_failure_s: float | None  # longest failed call started during the outage
    # Latest end after the kill of a failed in-flight call whose output had not begun.
    max_waiting_end_s: float | None
    num_bystanders: int
    num_bystanders_ok: int
    recovery_s: float | None  # kill to serving normally again; None: never seen back
    target_recovery_s: float
    bad_calls: tuple[str, ...]  # why each call that missed a target missed it
    model_load_s: float | None = None  # the restarted process's start to serving
    wire_codes: dict[str, int] | None = None  # "WIRE -> SDK" -> calls, where they differ

    @property
    def bystander_rate(self) -> float | None:
        return None if not self.num_bystanders else self.num_bystanders_ok / self.num_bystanders

    @property
    def is_recovered_in_time(self) -> bool:
        return self.recovery_s is not None and self.recovery_s <= self.target_recovery_s

    @property
    def is_passed(self) -> bool:
        return not self.bad_calls and self.is_recovered_in_time


def recovery_at(probes: Sequence[CallRecord], *, killed_at: float, back_at: float | None
                ) -> float | None:
    """When the mesh served normally again: the killed process is back (``back_at``:
    restarted, serving, in Envoy's rotation), and, if a probe failed after the kill, a
    probe succeeded that started no earlier than the last failed one ended. None when
    either never happened. (With no probe failed, as for a process the mesh fails open
    for, it is ``back_at``: probes queued at a busy worker would only add their wait.)"""
    if back_at is None:
        return None
    after = sorted((p for p in probes if p.ended_at > killed_at), key=lambda p: p.started_at)
    if all(p.code == OK for p in after):
        return back_at
    last_failure_end = max((p.ended_at for p in after if p.code != OK), default=killed_at)
    first_ok = next((p for p in after if p.code == OK and p.started_at >= last_failure_end),
                    None)
    if first_ok is None:
        return None
    return max(back_at, first_ok.started_at)


def judge(calls: Iterable[CallRecord], *, process: str, killed_at: float,
          recovered_at: float | None, model_load_s: float | None = None) -> FaultRow:
    """The row of one kill from every call of the load (probes included) around it."""
    target = MAX_RECOVERY_S
    if loads_a_model(process) and model_load_s is not None:
        target = max(target, model_load_s + LOAD_RECOVERY_MARGIN_S)
    outage_end = recovered_at if recovered_at is not None else float("inf")
    in_flight: Counter[str] = Counter()
    outage: Counter[str] = Counter()
    max_failed_end = max_outage_failure = max_waiting_end = None
    num_bystanders = num_bystanders_ok = 0
    bad: list[str] = []
    wire: Counter[str] = Counter()
    for call in calls:
        is_in_flight = call.started_at < killed_at < call.ended_at
        is_in_outage = killed_at <= call.started_at < outage_end
        if not (is_in_flight or is_in_outage):
            continue
        (in_flight if is_in_flight else outage)[call.code] += 1
        if call.wire_code:
            wire[f"{call.wire_code} -> {call.code}"] += 1
        when = "in flight" if is_in_flight else "during the outage"
        # Streaming at the kill: from the kill; during the outage: from its own start.
        is_streaming = call.first_token_at is not None and call.first_token_at < killed_at
        took_s = call.ended_at - (killed_at if is_in_flight else call.started_at)
        is_timed = is_streaming or not is_in_flight
        if call.code != OK:
            if not is_in_flight:
                max_outage_failure = max(max_outage_failure or 0.0, took_s)
            elif is_streaming:
                max_failed_end = max(max_failed_end or 0.0, took_s)
            else:
                max_waiting_end = max(max_waiting_end or 0.0, took_s)
        if is_bystander(call, process, killed_at):
            num_bystanders += 1
            num_bystanders_ok += call.code == OK
            if call.code != OK:
                bad.append(f"{call.kind} {when}, not needing {process}: {call.code} "
                           f"{call.details[:100]!r}")
        elif call.code != OK and call.code != UNAVAILABLE:
            bad.append(f"{call.kind} {when}: {call.code} {call.details[:100]!r}")
        elif call.code == UNAVAILABLE and is_timed and took_s > MAX_END_S:
            bad.append(f"{call.kind} {when}: UNAVAILABLE after {took_s:.2f} s")
    recovery_s = None if recovered_at is None else recovered_at - killed_at
    return FaultRow(process, dict(in_flight), max_failed_end, dict(outage), max_outage_failure,
                    max_waiting_end, num_bystanders, num_bystanders_ok, recovery_s, target,
                    tuple(bad), model_load_s, dict(wire) or None)


def _codes(counts: dict[str, int]) -> str:
    if not counts:
        return "-"
    return " ".join(f"{code} {n}" for code, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


HEADER = ("process", "in flight at the kill", "streaming, failed by (s)", "started in the outage",
          "longest failure (s)", "bystanders ok", "recovery (s)", "target (s)", "pass")


def table_rows(rows: Sequence[FaultRow]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for r in rows:
        rate = r.bystander_rate
        bystanders = ("n/a" if rate is None
                      else f"{r.num_bystanders_ok}/{r.num_bystanders} ({rate:.0%})")
        out.append((r.process, _codes(r.in_flight_codes), _seconds(r.max_failed_end_s),
                    _codes(r.outage_codes), _seconds(r.max_outage_failure_s), bystanders,
                    _seconds(r.recovery_s), f"{r.target_recovery_s:.2f}",
                    "yes" if r.is_passed else "NO"))
    return out


def format_table(rows: Sequence[FaultRow]) -> str:
    """A Markdown table; under it each model load, the codes the SDK reports otherwise
    than the wire, and the calls that missed a target (MAX_BAD_LINES per row)."""
    body = [HEADER, *table_rows(rows)]
    widths = [max(len(line[i]) for line in body) for i in range(len(HEADER))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    lines = [line(HEADER), "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += [line(cells) for cells in body[1:]]
    for r in rows:
        if loads_a_model(r.process):
            lines.append(f"{r.process}: restarted process loaded in "
                         f"{_seconds(r.model_load_s)} s (start to serving)")
        if r.max_waiting_end_s is not None:
            lines.append(f"{r.process}: in flight before their output began, failed calls "
                         f"ended by {r.max_waiting_end_s:.2f} s after the kill")
        if r.wire_codes:
            lines.append(f"{r.process}: on the wire: {_codes(r.wire_codes)}")
        if not r.is_recovered_in_time:
            lines.append(f"{r.process}: recovery {_seconds(r.recovery_s)} s, target "
                         f"{r.target_recovery_s:.2f} s")
        lines += [f"{r.process}: {why}" for why in r.bad_calls[:MAX_BAD_LINES]]
        if len(r.bad_calls) > MAX_BAD_LINES:
            lines.append(f"{r.process}: ... {len(r.bad_calls) - MAX_BAD_LINES} more calls")
    return "\n".join(lines)
