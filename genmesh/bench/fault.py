"""`genmesh fault kill`: under steady load through Envoy's edge, SIGKILL each process
type of the mesh in turn and measure what clients see (``fault_report``).

The load is an independent gRPC client (plain stubs, no SDK: the codes are the wire's):
``num_streams`` streaming generations of new prompts back to back, one client replaying
a cached answer, and a prober sending a one-token generation of a new prompt every
``probe_interval_s`` to tell when the mesh serves normally again. Each kill waits for
streams to be generating, SIGKILLs the process (``genmesh up``'s supervisor restarts
it), waits until it is back (a new process, serving, in Envoy's rotation) and a probe
succeeds, lets the load run a little longer, and judges every call around the kill.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import psutil

from genmesh.bench.fault_mesh import Mesh, fault_deployment, supervised_mesh, wait_for
from genmesh.bench.fault_report import CallKind, CallRecord, FaultRow, judge, recovery_at
from genmesh.client.types import DEV_API_KEY, GenmeshError
from genmesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc

# What a kill of each type takes out, in the order they are killed. Envoy is not one of
# them: it is the gateway the measurement goes through.
PROCESSES = ("worker-v1", "tokenizer", "safety", "cache", "redis", "ratelimit", "frontend")
CACHED_PROMPT = "Name a primary colour."
STREAM_PROMPT = "Count slowly from one to one hundred."
# Streams and probes skip the response cache (a replay would not reach the worker), so
# they need no unique prompts; a prompt made unique with a random suffix was sometimes
# refused as an injection by the safety service's classifier.
RETRY_PAUSE_S = 0.1  # a client's pause after a failed call (refusals come at once)
MAX_PROBES_IN_FLIGHT = 8


def codes_of(exc: grpc.RpcError) -> tuple[str, str, str]:
    """(code as the genmesh SDK reports it, its message, the wire's code if different)."""
    wire = exc.code().name
    error = GenmeshError.from_rpc(exc)
    return error.code.name, error.message, "" if error.code.name == wire else wire


@dataclass(frozen=True, slots=True)
class FaultConfig:
    processes: tuple[str, ...] = PROCESSES
    num_streams: int = 4  # streaming clients, each one generation after another
    stream_tokens: int = 16  # tokens per streamed generation (EOS ignored)
    probe_interval_s: float = 0.1
    # No call should get near it: generous, as a shared 2-core machine may give each
    # stream ~1 token/s.
    call_timeout_s: float = 120.0
    steady_s: float = 3.0  # load before each kill
    settle_s: float = 2.0  # load after the mesh is back, still judged
    back_timeout_s: float = 120.0  # longest wait for a killed process to be back
    api_key: str = DEV_API_KEY
    model: str | None = None  # None: the deployment's
    dtype: str | None = None
    kv_cache_gib: float = 0.5


@dataclass
class Load:
    """The clients' threads and every call they made."""

    edge: str
    config: FaultConfig
    calls: list[CallRecord] = field(default_factory=list)
    # Streams now running: id -> (start, first text or None).
    running: dict[int, tuple[float, float | None]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)
    ids: itertools.count = field(default_factory=itertools.count)

    def start(self) -> None:
        workers: list[Callable[[], None]] = [self._streams] * self.config.num_streams
        workers += [self._cached, self._probes]
        for n, target in enumerate(workers):
            thread = threading.Thread(target=target, name=f"load-{n}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=self.config.call_timeout_s + 5)

    def snapshot(self) -> list[CallRecord]:
        with self.lock:
            return list(self.calls)

    def num_generating(self) -> int:
        with self.lock:
            return sum(first is not None for _, first in self.running.values())

    def oldest_running(self) -> float | None:
        with self.lock:
            return min((start for start, _ in self.running.values()), default=None)

    def _record(self, call: CallRecord) -> None:
        with self.lock:
            self.calls.append(call)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.config.api_key),)

    def _streams(self) -> None:
        with grpc.insecure_channel(self.edge) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            while not self.stop.is_set():
                call = self._stream_once(stub)
                self._record(call)
                if call.code != "OK":
                    self.stop.wait(RETRY_PAUSE_S)

    def _stream_once(self, stub: generation_pb2_grpc.GenerationStub) -> CallRecord:
        request = generation_pb2.GenerateRequest(
            prompt=STREAM_PROMPT, skip_cache=True,
            params=common_pb2.SamplingParams(max_tokens=self.config.stream_tokens,
                                             ignore_eos=True))
        call_id = next(self.ids)
        started = time.monotonic()
        first_at: float | None = None
        with self.lock:
            self.running[call_id] = (started, None)
        code, details, wire = "OK", "", ""
        try:
            for reply in stub.GenerateStream(request, metadata=self._metadata(),
                                             timeout=self.config.call_timeout_s):
                if first_at is None and reply.text:
                    first_at = time.monotonic()
                    with self.lock:
                        self.running[call_id] = (started, first_at)
        except grpc.RpcError as exc:
            code, details, wire = codes_of(exc)
        finally:
            with self.lock:
                del self.running[call_id]
        return CallRecord(CallKind.STREAM, started, time.monotonic(), code, details, first_at,
                          wire)

    def _unary(self, stub: generation_pb2_grpc.GenerationStub, kind: CallKind, *,
               max_tokens: int, skip_cache: bool) -> None:
        request = generation_pb2.GenerateRequest(
            prompt=CACHED_PROMPT, skip_cache=skip_cache,
            params=common_pb2.SamplingParams(max_tokens=max_tokens))
        started = time.monotonic()
        code, details, wire = "OK", "", ""
        try:
            stub.Generate(request, metadata=self._metadata(), timeout=self.config.call_timeout_s)
        except grpc.RpcError as exc:
            code, details, wire = codes_of(exc)
        self._record(CallRecord(kind, started, time.monotonic(), code, details, wire_code=wire))

    def _cached(self) -> None:
        with grpc.insecure_channel(self.edge) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            while not self.stop.wait(0.2):
                self._unary(stub, CallKind.CACHED, max_tokens=8, skip_cache=False)

    def _probes(self) -> None:
        """A probe every ``probe_interval_s`` whether the last one has ended or not (one
        may wait seconds for its turn on a busy worker), up to MAX_PROBES_IN_FLIGHT."""
        in_flight = threading.Semaphore(MAX_PROBES_IN_FLIGHT)

        def probe() -> None:
            try:
                self._unary(stub, CallKind.PROBE, max_tokens=1, skip_cache=True)
            finally:
                in_flight.release()

        with (grpc.insecure_channel(self.edge) as channel,
              ThreadPoolExecutor(MAX_PROBES_IN_FLIGHT, thread_name_prefix="probe") as pool):
            stub = generation_pb2_grpc.GenerationStub(channel)
            while not self.stop.wait(self.config.probe_interval_s):
                if in_flight.acquire(blocking=False):
                    pool.submit(probe)


@dataclass(frozen=True, slots=True)
class Kill:
    """What the suite saw of one kill besides the calls: monotonic times."""

    process: str
    killed_at: float
    back_at: float | None  # a new process serving and in Envoy's rotation
    model_load_s: float | None  # the new process's start to serving (its load time)


def kill_and_wait(mesh: Mesh, process: str, *, timeout_s: float) -> Kill:
    """SIGKILL ``process`` and wait until the supervisor's new one serves and Envoy has it
    in rotation."""
    old_pid = mesh.pid(process)
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    restarted = wait_for(lambda: mesh.pid(process) != old_pid, timeout_s=timeout_s)
    if restarted is None:
        return Kill(process, killed_at, None, None)
    new_pid = mesh.pid(process)
    serving_at = wait_for(lambda: mesh.is_serving(process), timeout_s=timeout_s)
    if serving_at is None:
        return Kill(process, killed_at, None, None)
    # The process's own start, from the kernel (wall clock), to its first SERVING probe.
    try:
        load_s = time.time() - (time.monotonic() - serving_at) - psutil.Process(
            new_pid).create_time()
    except psutil.NoSuchProcess:
        load_s = None
    back_at = wait_for(lambda: mesh.is_in_rotation(process), timeout_s=timeout_s)
    return Kill(process, killed_at, back_at, load_s)


def fault_once(mesh: Mesh, load: Load, process: str, config: FaultConfig) -> tuple[Kill, FaultRow]:
    time.sleep(config.steady_s)
    wait_for(lambda: load.num_generating() >= 1, timeout_s=60)
    kill = kill_and_wait(mesh, process, timeout_s=config.back_timeout_s)
    # The mesh is back once a probe that started after the kill's last failed probe ended
    # succeeded; then the load runs on a little, and every call in flight at the kill ends.
    recovered = None
    if kill.back_at is not None:
        def is_recovered() -> bool:
            probes = [c for c in load.snapshot() if c.kind is CallKind.PROBE]
            return recovery_at(probes, killed_at=kill.killed_at, back_at=kill.back_at) is not None

        recovered = wait_for(is_recovered, timeout_s=60)
    time.sleep(config.settle_s)
    wait_for(lambda: (load.oldest_running() or float("inf")) > kill.killed_at,
             timeout_s=config.call_timeout_s + 5)
    calls = load.snapshot()
    probes = [c for c in calls if c.kind is CallKind.PROBE]
    recovered_at = (recovery_at(probes, killed_at=kill.killed_at, back_at=kill.back_at)
                    if recovered is not None else None)
    return kill, judge(calls, process=process, killed_at=kill.killed_at,
                       recovered_at=recovered_at, model_load_s=kill.model_load_s)


def run_fault_suite(config: FaultConfig, *, run_dir: Path,
                    on_row: Callable[[FaultRow], None] | None = None) -> list[FaultRow]:
    """Start the mesh, put the load on it, kill each of ``config.processes`` in turn.
    Every call and kill is also written to ``run_dir/calls.jsonl`` (times in seconds
    from the load's start), to look into a miss."""
    run_dir.mkdir(parents=True, exist_ok=True)
    deployment = fault_deployment(run_dir / "fault-deployment.yaml")
    rows: list[FaultRow] = []
    kills: list[Kill] = []
    with supervised_mesh(run_dir, model=config.model, dtype=config.dtype,
                         kv_cache_gib=config.kv_cache_gib, deployment=deployment) as mesh:
        unknown = set(config.processes) - set(mesh.supervisor.procs)
        if unknown:
            raise ValueError(f"no such process in the mesh: {sorted(unknown)} "
                             f"(there are {sorted(mesh.supervisor.procs)})")
        load = Load(mesh.edge_address, config)
        started = time.monotonic()
        load.start()
        try:
            for process in config.processes:
                kill, row = fault_once(mesh, load, process, config)
                kills.append(kill)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
        finally:
            load.close()
            _write_calls(run_dir / "calls.jsonl", kills, load.snapshot(), started)
    return rows


def _write_calls(path: Path, kills: list[Kill], calls: list[CallRecord], t0: float) -> None:
    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 3)

    with open(path, "w") as out:
        for k in kills:
            out.write(json.dumps({"kill": k.process, "at": rel(k.killed_at),
                                  "back_at": rel(k.back_at), "load_s": k.model_load_s}) + "\n")
        for c in calls:
            out.write(json.dumps(asdict(c) | {"started_at": rel(c.started_at),
                                              "ended_at": rel(c.ended_at),
                                              "first_token_at": rel(c.first_token_at)}) + "\n")


def parse_processes(text: str | None) -> Sequence[str]:
    if not text:
        return PROCESSES
    return tuple(p.strip() for p in text.split(",") if p.strip())
