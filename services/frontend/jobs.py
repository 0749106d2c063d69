"""The durable queue behind async jobs (SubmitJob, GetJob, WatchJob, CancelJob).

Frontends are both producers (the API submits, reads, watches and cancels jobs) and
consumers (a runner takes jobs, keeps them alive with heartbeats and finishes them).
Everything lives in one Redis:

A job is named by its tenant and its id: job ids are the tenant's own, so the same id in
two tenants is two jobs, and no call of one tenant reads, blocks or touches another's.

- ``{prefix}:stream``: the queue, a stream whose entries carry ``tenant`` and ``job_id``,
  read by the consumer group ``group``. A taken entry is pending (in the group's PEL) under its
  consumer until that consumer finishes it; an entry idle for ``claim_timeout_s`` (no
  heartbeat) is taken over by another consumer (XAUTOCLAIM). Entries are acknowledged and
  deleted when their job ends, so the stream holds only queued and running work.
- ``{prefix}:job:{tenant}:{job_id}``: a hash, the job record (JobRecord's fields, plus the
  queue entry that runs it, the consumer holding it, and which claim ended it).
- ``{prefix}:events:{tenant}:{job_id}``: a stream of the record's changes, without the
  result (QUEUED, RUNNING once per attempt, then one terminal event), at most
  _MAX_NUM_EVENTS long; WatchJob reads it.

The tenant in a key is percent-encoded (it holds no ``:``), so a key names one (tenant,
job id) pair however either is spelled. A queue entry written before job ids were scoped
(no ``tenant``) names no record under these keys: a consumer drops it as a stale entry.

Why exactly-once holds: every change of a record is one Lua script that checks the state
and writes the hash and its event together, and no script moves a terminal job anywhere.
So a job ends once (the first finish or cancel wins, and later ones return False), and a
watcher sees exactly one terminal event. A consumer presumed dead that comes back late
loses nothing and breaks nothing: its heartbeat returns False and its finish, if the job
already ended, only acknowledges its entry.

Timestamps are Redis's clock (``TIME`` inside the scripts), the same for every frontend.
The scripts touch the job keys of entries they read, so this needs one Redis 6.2 or later
(XAUTOCLAIM), with or without replicas, not Redis Cluster. The client must return bytes
(decode_responses off): requests and results are serialized protos.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, Awaitable, Mapping
from dataclasses import dataclass, replace
from string import Template
from typing import Any, TypeVar, cast
from urllib.parse import quote

import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from genmesh.v1 import generation_pb2

T = TypeVar("T")

JobState = generation_pb2.JobState
TERMINAL: frozenset[int] = frozenset({
    JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED, JobState.JOB_STATE_CANCELLED})

MAX_JOB_ID_CHARS = 128
_MAX_NUM_EVENTS = 32  # a job has 2 + attempts events; trimming drops only middle ones
_MAX_NUM_STALE_SCANS = 50  # XAUTOCLAIM calls per take (each looks at <= 10 pending entries)
_DEFAULT_MAX_BLOCK_MS = 1000  # per blocking read, when the client has no socket timeout

# The start script's outcomes.
_STARTED, _SKIPPED, _LOST = 1, 0, -1

_LUA_HELPERS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function is_terminal(state)
  return state == $SUCCEEDED or state == $FAILED or state == $CANCELLED
end
local function append_event(key, state, now, num_attempts, error_code, error)
  redis.call('XADD', key, 'MAXLEN', $MAX_NUM_EVENTS, '*', 'state', state,
             'updated_ms', now, 'num_attempts', num_attempts, 'error_code', error_code,
             'error', error)
end
local function owns_entry(stream, group, consumer, entry_id)
  local pending = redis.call('XPENDING', stream, group, entry_id, entry_id, 1)
  return #pending == 1 and pending[1][2] == consumer
end
"""

# KEYS: job, events, stream (the keys are the tenant's). ARGV: tenant, request, job id.
# Returns {1, record} when created, {0, record} when it existed as submitted, {-1} on conflict.
_SUBMIT_LUA = """
local found = redis.call('HGET', KEYS[1], 'request')
if found then
  if found == ARGV[2] then
    return {0, redis.call('HGETALL', KEYS[1])}
  end
  return {-1}
end
local now = now_ms()
redis.call('DEL', KEYS[2])  -- events of an expired job of the same id
local entry_id = redis.call('XADD', KEYS[3], '*', 'tenant', ARGV[1], 'job_id', ARGV[3])
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'request', ARGV[2], 'state', $QUEUED,
           'result', '', 'error_code', 0, 'error', '', 'created_ms', now, 'updated_ms', now,
           'num_attempts', 0, 'entry_id', entry_id, 'consumer', '', 'ended_by', '')
append_event(KEYS[2], $QUEUED, now, 0, 0, '')
return {1, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: job, events, stream. ARGV: group, consumer, entry id.
# Called after this consumer read or claimed the entry. Another consumer may have taken it
# over since (we stalled past the timeout): then it is theirs (LOST). An entry whose job
# ended, expired, or was resubmitted under a new entry is acknowledged and dropped.
_START_LUA = """
if not owns_entry(KEYS[3], ARGV[1], ARGV[2], ARGV[3]) then
  return {$LOST}
end
local found = redis.call('HMGET', KEYS[1], 'state', 'entry_id')
local state = tonumber(found[1])
if not state or is_terminal(state) or found[2] ~= ARGV[3] then
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[3])
  redis.call('XDEL', KEYS[3], ARGV[3])
  return {$SKIPPED}
end
local now = now_ms()
local num_attempts = redis.call('HINCRBY', KEYS[1], 'num_attempts', 1)
redis.call('HSET', KEYS[1], 'state', $RUNNING, 'updated_ms', now, 'consumer', ARGV[2])
append_event(KEYS[2], $RUNNING, now, num_attempts, 0, '')
return {$STARTED, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: job, stream. ARGV: group, consumer, entry id, the claim's num_attempts.
# Only the current claim is kept alive: not one that was taken over, even by itself.
_HEARTBEAT_LUA = """
local found = redis.call('HMGET', KEYS[1], 'state', 'num_attempts', 'entry_id')
if tonumber(found[1]) ~= $RUNNING or found[2] ~= ARGV[4] or found[3] ~= ARGV[3] then
  return 0
end
if not owns_entry(KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then
  return 0
end
redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')  -- idle time -> 0
return 1
"""

# KEYS: job, events, stream. ARGV: group, entry id, state, result, error code, error,
# ttl seconds, claim token. Returns 1 if this claim ended the job (also when this is a
# retry of the call that did), else 0. The entry is acknowledged either way.
_FINISH_LUA = """
local found = redis.call('HMGET', KEYS[1], 'state', 'entry_id', 'ended_by', 'num_attempts')
local state = tonumber(found[1])
local is_ended_here = 0
if state and found[2] == ARGV[2] then
  if not is_terminal(state) then
    local now = now_ms()
    redis.call('HSET', KEYS[1], 'state', ARGV[3], 'result', ARGV[4], 'error_code', ARGV[5],
               'error', ARGV[6], 'updated_ms', now, 'ended_by', ARGV[8])
    append_event(KEYS[2], ARGV[3], now, found[4], ARGV[5], ARGV[6])
    redis.call('EXPIRE', KEYS[1], ARGV[7])
    redis.call('EXPIRE', KEYS[2], ARGV[7])
    is_ended_here = 1
  elseif found[3] == ARGV[8] then
    is_ended_here = 1
  end
end
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[3], ARGV[2])
return is_ended_here
"""

# KEYS: job, events. ARGV: ttl seconds. Returns {} for an unknown job, else {record}.
# The queue entry stays: whoever reads it next drops it (see _START_LUA). Deleting an
# entry that a consumer may already hold would leave a pending entry with no data.
_CANCEL_LUA = """
local found = redis.call('HMGET', KEYS[1], 'state', 'num_attempts')
local state = tonumber(found[1])
if not state then
  return {}
end
if not is_terminal(state) then
  local now = now_ms()
  redis.call('HSET', KEYS[1], 'state', $CANCELLED, 'updated_ms', now, 'ended_by', 'cancel')
  append_event(KEYS[2], $CANCELLED, now, found[2], 0, '')
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
return {redis.call('HGETALL', KEYS[1])}
"""


def _script(body: str) -> str:
    return Template(_LUA_HELPERS + body).substitute(
        QUEUED=JobState.JOB_STATE_QUEUED, RUNNING=JobState.JOB_STATE_RUNNING,
        SUCCEEDED=JobState.JOB_STATE_SUCCEEDED, FAILED=JobState.JOB_STATE_FAILED,
        CANCELLED=JobState.JOB_STATE_CANCELLED, MAX_NUM_EVENTS=_MAX_NUM_EVENTS,
        STARTED=_STARTED, SKIPPED=_SKIPPED, LOST=_LOST)


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    tenant: str  # whose job it is (from the API key)
    state: int  # a JobState value
    request: bytes  # serialized GenerateRequest, as submitted
    result: bytes  # serialized GenerateResponse; b"" until SUCCEEDED
    error_code: int  # a google.rpc code with FAILED, else 0
    error: str  # what went wrong, with FAILED
    created_ms: int  # unix ms (Redis's clock)
    updated_ms: int  # unix ms of the last state change
    num_attempts: int  # times a consumer started it (more than 1 after a takeover)

    def to_proto(self) -> generation_pb2.Job:
        job = generation_pb2.Job(
            job_id=self.job_id, state=cast(generation_pb2.JobState, self.state),
            error_code=self.error_code, error=self.error, created_unix_ms=self.created_ms,
            updated_unix_ms=self.updated_ms, num_attempts=self.num_attempts)
        if self.result:
            job.result.ParseFromString(self.result)
        return job


@dataclass(frozen=True, slots=True)
class Claim:
    """A job a consumer has taken; heartbeat and finish it on the JobQueue that took it."""

    tenant: str  # whose job it is; with job_id, what names the job
    job_id: str
    entry_id: str  # the queue entry (what XACK and XCLAIM name)
    record: JobRecord  # RUNNING, num_attempts already counting this attempt


class JobConflict(Exception):
    """A job id the same tenant already used for a different request."""


class JobStoreUnavailable(Exception):
    """Redis failed or did not answer in time; the message says which and why."""


class InvalidJobId(ValueError):
    """A job id that is empty, too long, or not printable without whitespace."""


class WatchTimeout(TimeoutError):
    """The watched job did not end within the watch's time."""


class _NoGroup(JobStoreUnavailable):
    """The consumer group is gone (Redis restarted empty): take() makes it again."""


@dataclass(frozen=True, slots=True)
class JobQueueConfig:
    claim_timeout_s: float = 30.0  # a running job with no heartbeat this long is taken over
    result_ttl_s: int = 86_400  # how long a job (record, events) is kept after it ends
    prefix: str = "genmesh:jobs"  # Redis key prefix
    group: str = "genmesh-frontends"  # the consumer group every frontend joins
    # Bound on one Redis call, on top of the time a blocking read may wait. The client's
    # own socket timeout usually answers first; this holds even for a client without one.
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("claim_timeout_s", "result_ttl_s", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.prefix or not self.group:
            raise ValueError("prefix and group must not be empty")


class JobQueue:
    """One frontend's handle on the job queue; the only owner of the job keys."""

    def __init__(self, client: redis.Redis, config: JobQueueConfig, *, consumer: str) -> None:
        if not consumer:
            raise ValueError("consumer must name this frontend (unique among live ones)")
        pool_options = client.connection_pool.connection_kwargs
        if pool_options.get("decode_responses"):
            raise ValueError("the job queue needs a Redis client with decode_responses off")
        self.client = client
        self.config = config
        self.consumer = consumer
        self._stream = f"{config.prefix}:stream"
        # A blocking read must return before the client's socket timeout, or redis-py
        # reports a timeout: long waits are made of several shorter reads.
        socket_timeout = pool_options.get("socket_timeout")
        self._max_block_ms = (_DEFAULT_MAX_BLOCK_MS if socket_timeout is None
                              else max(1, int(socket_timeout * 1000 / 2)))
        self._stale_cursor = "0-0"  # where the next XAUTOCLAIM scan of the PEL resumes
        self._has_group = False
        self._submit_script = client.register_script(_script(_SUBMIT_LUA))
        self._start_script = client.register_script(_script(_START_LUA))
        self._heartbeat_script = client.register_script(_script(_HEARTBEAT_LUA))
        self._finish_script = client.register_script(_script(_FINISH_LUA))
        self._cancel_script = client.register_script(_script(_CANCEL_LUA))

    # Producer / API side.

    async def submit(self, job_id: str, request: bytes, *, tenant: str) -> JobRecord:
        """Queues the tenant's job ``job_id``, or returns the existing one when the tenant
        submitted that id before with the same request bytes (serialize deterministically).
        Raises JobConflict when the tenant used the id for a different request; another
        tenant's jobs never matter. An id whose job expired may be used again."""
        _check_job_id(job_id)
        reply = await self._call("submitting a job", self._submit_script(
            keys=self._job_keys(tenant, job_id), args=[tenant, request, job_id]))
        if int(reply[0]) < 0:
            raise JobConflict(f"job id {job_id!r} is already used by a different request; "
                              "submit this request under a new job id")
        return _record(job_id, reply[1])

    async def get(self, job_id: str, *, tenant: str) -> JobRecord | None:
        """The tenant's job's record; None when the tenant has no such job (unknown or
        expired)."""
        _check_job_id(job_id)
        record_key, _ = job_keys(self.config.prefix, tenant, job_id)
        fields = await self._call("reading a job", self.client.hgetall(record_key))
        return _record(job_id, fields) if fields else None

    async def cancel(self, job_id: str, *, tenant: str) -> JobRecord | None:
        """Cancels the tenant's queued or running job (the runner learns it from its next
        heartbeat); a job that ended is returned unchanged; None when the tenant has no
        such job."""
        _check_job_id(job_id)
        reply = await self._call("cancelling a job", self._cancel_script(
            keys=self._job_keys(tenant, job_id)[:2], args=[self.config.result_ttl_s]))
        return _record(job_id, reply[0]) if reply else None

    async def watch(self, job_id: str, *, tenant: str, timeout_s: float
                    ) -> AsyncGenerator[JobRecord, None]:
        """Yields the tenant's job's record now, then the record after every change (a
        takeover is a change: RUNNING again, one more attempt), and stops after a terminal
        one. Yields nothing when the tenant has no such job. Raises WatchTimeout when the
        job has not ended within ``timeout_s`` (each read of the events blocks for a
        bounded time, never indefinitely)."""
        _check_job_id(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        record, last_event_id = await self._snapshot(tenant, job_id)
        if record is None:
            return
        yield record
        _, events_key = job_keys(self.config.prefix, tenant, job_id)
        while record.state not in TERMINAL:
            left_ms = math.ceil((deadline - loop.time()) * 1000)
            if left_ms <= 0:
                raise WatchTimeout(f"job {job_id!r} did not end within {timeout_s:g} s")
            block_ms = min(left_ms, self._max_block_ms)
            reply = await self._call("watching a job", self.client.xread(
                {events_key: last_event_id}, count=_MAX_NUM_EVENTS, block=block_ms),
                block_ms=block_ms)
            for event_id, event in _entries(reply):
                last_event_id = event_id
                record = _with_event(record, event)
                if record.state in TERMINAL:  # the result is only in the record
                    record = await self.get(job_id, tenant=tenant) or record
                yield record
                if record.state in TERMINAL:
                    return

    # Consumer / runner side.

    async def ensure_group(self) -> None:
        """Creates the queue and its consumer group if missing. The group starts at the
        stream's beginning, so jobs submitted before any consumer existed are run."""
        async def create() -> None:
            try:
                await self.client.xgroup_create(self._stream, self.config.group, id="0",
                                                mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):  # BUSYGROUP: it exists already
                    raise

        await self._call("creating the consumer group", create())
        self._has_group = True

    async def take(self, *, block_ms: int) -> Claim | None:
        """Takes a job and marks it RUNNING: first one whose consumer stopped heartbeating,
        else a new one, waiting up to ``block_ms`` (0: not at all). Entries of jobs that
        already ended are acknowledged and skipped. None when nothing came in time."""
        if block_ms < 0:
            raise ValueError(f"block_ms must not be negative, got {block_ms}")
        if not self._has_group:
            await self.ensure_group()
        try:
            return await self._take(block_ms)
        except _NoGroup:
            await self.ensure_group()
            return await self._take(block_ms)

    async def heartbeat(self, claim: Claim) -> bool:
        """Keeps the claim from being taken over (resets its idle time); send one every
        claim_timeout_s / 3 or so. False when it is no longer this runner's to finish: the
        job ended (cancelled, or finished elsewhere) or another consumer took it over. The
        runner then stops working on it."""
        job_key, _, stream = self._job_keys(claim.tenant, claim.job_id)
        is_kept = await self._call("sending a heartbeat", self._heartbeat_script(
            keys=[job_key, stream], args=[self.config.group, self.consumer, claim.entry_id,
                                          claim.record.num_attempts]))
        return bool(is_kept)

    async def finish(self, claim: Claim, *, result: bytes | None = None, error_code: int = 0,
                     error: str = "") -> bool:
        """Ends the job: SUCCEEDED with ``result``, or FAILED with ``error_code`` (a non-zero
        google.rpc code) and ``error``; its record and events then expire after
        result_ttl_s. True if this claim ended the job; False if it had ended already
        (cancelled, or finished by a consumer that took it over or was taken over), in which
        case only the queue entry is acknowledged."""
        if result is not None and error_code:
            raise ValueError("a job either succeeds with a result or fails with an error_code")
        if result is None and not error_code:
            raise ValueError("a failed job needs a non-zero google.rpc error_code")
        state = JobState.JOB_STATE_SUCCEEDED if result is not None else JobState.JOB_STATE_FAILED
        # Names this claim in the record, so a retried finish still answers True.
        token = f"{self.consumer}:{claim.record.num_attempts}"
        is_ended_here = await self._call("finishing a job", self._finish_script(
            keys=self._job_keys(claim.tenant, claim.job_id),
            args=[self.config.group, claim.entry_id, state, result or b"", error_code, error,
                  self.config.result_ttl_s, token]))
        return bool(is_ended_here)

    async def _take(self, block_ms: int) -> Claim | None:
        claim = await self._take_stale()
        if claim is not None:
            return claim
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        while True:
            left_ms = max(0, math.ceil((deadline - loop.time()) * 1000))
            # BLOCK 0 would wait forever: a read with no time left does not block at all.
            wait_ms = min(left_ms, self._max_block_ms) or None
            reply = await self._call("reading the queue", self.client.xreadgroup(
                self.config.group, self.consumer, {self._stream: ">"}, count=1, block=wait_ms),
                block_ms=wait_ms or 0)
            for entry_id, fields in _entries(reply):
                claim = await self._start(entry_id, fields)
                if claim is not None:
                    return claim
            if loop.time() >= deadline:
                return None

    async def _take_stale(self) -> Claim | None:
        """Takes over one entry idle for claim_timeout_s, scanning the PEL from where the
        last scan stopped, until a job starts or the scan reaches the end."""
        min_idle_ms = math.ceil(self.config.claim_timeout_s * 1000)
        for _ in range(_MAX_NUM_STALE_SCANS):
            reply = await self._call("taking over a job", self.client.xautoclaim(
                self._stream, self.config.group, self.consumer, min_idle_ms,
                start_id=self._stale_cursor, count=1))
            self._stale_cursor = _text(reply[0])
            for entry_id, fields in reply[1]:
                if entry_id is None:  # deleted from the stream; we never delete pending ones
                    continue
                claim = await self._start(entry_id, fields)
                if claim is not None:
                    return claim
            if self._stale_cursor == "0-0":
                return None
        return None

    async def _start(self, entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> Claim | None:
        tenant = _text(fields.get(b"tenant", b""))
        job_id = _text(fields.get(b"job_id", b""))
        entry = _text(entry_id)
        reply = await self._call("starting a job", self._start_script(
            keys=self._job_keys(tenant, job_id),
            args=[self.config.group, self.consumer, entry]))
        if int(reply[0]) != _STARTED:
            return None
        return Claim(tenant, job_id, entry, _record(job_id, reply[1]))

    async def _snapshot(self, tenant: str, job_id: str) -> tuple[JobRecord | None, bytes]:
        """The record and the id of its latest event, read in one transaction: events after
        that id are exactly the changes the record does not show yet."""
        job_key, events_key = job_keys(self.config.prefix, tenant, job_id)

        async def read() -> list[Any]:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hgetall(job_key)
                pipe.xrevrange(events_key, count=1)
                return cast(list[Any], await pipe.execute())

        fields, latest = await self._call("watching a job", read())
        if not fields:
            return None, b"0-0"
        return _record(job_id, fields), latest[0][0] if latest else b"0-0"

    def _job_keys(self, tenant: str, job_id: str) -> list[str]:
        """[record, events, queue], as the scripts take them."""
        return [*job_keys(self.config.prefix, tenant, job_id), self._stream]

    async def _call(self, doing: str, call: Awaitable[T], *, block_ms: int = 0) -> T:
        task = asyncio.current_task()
        num_cancels = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(self.config.timeout_s + block_ms / 1000):
                reply = await call
        except (RedisError, OSError) as exc:  # OSError covers TimeoutError
            reason = self._describe(exc, block_ms)
            if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                raise _NoGroup(f"the job store lost its consumer group: {reason}") from exc
            raise JobStoreUnavailable(f"the job store failed while {doing}: {reason}") from exc
        if task is not None and task.cancelling() > num_cancels:
            # redis-py sends through asyncio.wait_for, which on Python 3.11 returns normally
            # when a cancellation arrives just as the send completes. Honour it here, or a
            # runner that was cancelled (shut down) would go on taking jobs.
            raise asyncio.CancelledError
        return reply

    def _describe(self, exc: BaseException, block_ms: int) -> str:
        if isinstance(exc, TimeoutError | RedisTimeoutError):
            return f"no reply from Redis within {self.config.timeout_s + block_ms / 1000:g} s"
        return f"{type(exc).__name__}: {exc}"


def job_keys(prefix: str, tenant: str, job_id: str) -> tuple[str, str]:
    """The Redis keys of the tenant's job ``job_id``: (record, events). Record and events
    live under different names, so no job id can name another job's events."""
    scope = f"{quote(tenant, safe='')}:{job_id}"  # the quoted tenant holds no ':'
    return f"{prefix}:job:{scope}", f"{prefix}:events:{scope}"


def _check_job_id(job_id: str) -> None:
    if not job_id or len(job_id) > MAX_JOB_ID_CHARS:
        raise InvalidJobId(f"a job id must have 1 to {MAX_JOB_ID_CHARS} characters, "
                         f"got {len(job_id)}")
    if not job_id.isprintable() or any(c.isspace() for c in job_id):
        raise InvalidJobId(f"a job id must be printable with no whitespace, got {job_id!r}")


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREAD/XREADGROUP reply on one stream (RESP2 or RESP3 shape)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (s[1] for s in reply)
    return [(entry[0], entry[1]) for entries in streams for entry in entries]


def _record(job_id: str, fields: Any) -> JobRecord:
    """A record from HGETALL, as a dict (redis-py) or a flat list (a script's reply)."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    return JobRecord(
        job_id=job_id, tenant=_text(fields[b"tenant"]), state=int(fields[b"state"]),
        request=bytes(fields[b"request"]), result=bytes(fields[b"result"]),
        error_code=int(fields[b"error_code"]), error=_text(fields[b"error"]),
        created_ms=int(fields[b"created_ms"]), updated_ms=int(fields[b"updated_ms"]),
        num_attempts=int(fields[b"num_attempts"]))


def _with_event(record: JobRecord, event: Mapping[bytes, bytes]) -> JobRecord:
    return replace(record, state=int(event[b"state"]), updated_ms=int(event[b"updated_ms"]),
                   num_attempts=int(event[b"num_attempts"]),
                   error_code=int(event[b"error_code"]), error=_text(event[b"error"]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
