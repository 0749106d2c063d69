"""Issue 4 end to end: a real Envoy, Redis, rate-limit service and two worker versions.

One mesh for the module, started by the launcher from a deployment written here: tenants
with small limits, versions v1 and v2 of the default model (both bf16: 2-4x faster than fp32 on
a CPU; the tests tell the versions apart by the version each reply names).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import yaml

from gateway import xds
from gateway.envoy import dynamic_bootstrap, envoy_command
from genmesh.client import Client, GenmeshError
from genmesh.commands.rollout import apply_change, read_records, requests_per_version
from genmesh.core import deployment as deploy
from genmesh.core import metadata
from genmesh.core.deployment import DeploymentError, Rollout
from genmesh.launcher.plan import (
    DEPLOYMENT_FILE,
    PORT_FIELDS,
    XDS_DIR,
    MeshConfig,
    ProcessSpec,
)
from genmesh.launcher.ports import free_ports
from genmesh.launcher.probes import HttpReady
from genmesh.launcher.supervisor import Supervisor
from genmesh.rollout_report import compare
from genmesh.security import clients, pki
from genmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.frontend.budget import budget_key
from tests.procs import launched

MODEL = "smollm2-135m-instruct"
KEYS = {"alpha": "key-alpha", "beta": "key-beta", "gamma": "key-gamma", "delta": "key-delta"}
GAMMA_RPM = 12  # delta's global limit, requests per minute over all gateways
BUDGET = 600  # gamma's tokens per minute


def deployment_yaml() -> dict:
    return {
        "model": {"name": MODEL, "versions": {
            "v1": {"workers": ["127.0.0.1:1"], "dtype": "bfloat16"},
            "v2": {"workers": ["127.0.0.1:2"], "dtype": "bfloat16"}}},
        "services": {"frontend": ["127.0.0.1:3"], "tokenizer": ["127.0.0.1:4"],
                     "ratelimit": ["127.0.0.1:5"], "cache": ["127.0.0.1:7"]},
        "redis_url": "redis://127.0.0.1:6/0",
        "security": {"mtls": True},  # the launcher makes the secrets in the run directory
        "rollout": {"primary": "v1", "candidate": "v2"},
        "tenants": {
            "alpha": {"api_keys": [KEYS["alpha"]], "requests_per_second": 3},
            "beta": {"api_keys": [KEYS["beta"]], "requests_per_second": 1000},
            "gamma": {"api_keys": [KEYS["gamma"]], "requests_per_second": 1000,
                      "tokens_per_minute": BUDGET},
            "delta": {"api_keys": [KEYS["delta"]], "requests_per_second": 1000,
                      "requests_per_minute": GAMMA_RPM},
        },
    }


@dataclass
class GatewayMesh:
    config: MeshConfig
    supervisor: Supervisor

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def dep(self) -> deploy.Deployment:
        return deploy.load(self.run_dir / DEPLOYMENT_FILE)

    def client(self, tenant: str, address: str | None = None) -> Client:
        return Client(address or self.config.edge_address, timeout_s=60,
                      api_key=KEYS[tenant])

    @property
    def secrets(self) -> pki.Secrets:
        return pki.Secrets(self.config.secrets_dir)

    @property
    def redis_url(self) -> str:  # as the operator: the mesh's Redis has a user per service
        assert self.dep.redis_url is not None
        return pki.login(self.dep.redis_url, self.secrets, pki.OPERATOR)

    def mesh_channel(self, address: str | None = None) -> grpc.Channel:
        """Envoy's mesh listener as the frontend (what RBAC lets call the workers)."""
        return clients.channel(address or self.config.mesh_address, self.secrets,
                               identity="frontend", peer=pki.GATEWAY)

    def worker_stub(self) -> tuple[grpc.Channel, worker_pb2_grpc.WorkerStub]:
        channel = self.mesh_channel()
        return channel, worker_pb2_grpc.WorkerStub(channel)


@pytest.fixture(scope="module")
def gw(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayMesh]:
    run_dir = tmp_path_factory.mktemp("gateway-mesh")
    deployment_file = run_dir / "source.yaml"
    deployment_file.write_text(yaml.safe_dump(deployment_yaml()))
    ports = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)), strict=True))
    config = MeshConfig(**ports, deployment=deployment_file, kv_cache_gib=0.25, run_dir=run_dir,
                        with_prometheus=False)
    with launched(config, timeout_s=240) as supervisor:
        yield GatewayMesh(config, supervisor)


def wait_for_minute_room(seconds: float) -> None:
    """Fixed windows: don't start a count that could straddle a minute boundary."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.5)


def generate_direct(stub: worker_pb2_grpc.WorkerStub, *, pin: str = "", prefix_key: str = "",
                    served: str = metadata.MODEL_VERSION) -> str:
    """One tiny Generate through a mesh listener; the ``served`` reply metadata (by
    default the version that answered; ``metadata.WORKER_ID``: the replica)."""
    md = [(metadata.MODEL_VERSION, pin)] if pin else []
    if prefix_key:
        md.append((metadata.PREFIX_KEY, prefix_key))
    call = stub.Generate(worker_pb2.WorkerGenerateRequest(
        request_id=uuid.uuid4().hex, prompt_ids=[1, 2, 3],
        params=common_pb2.SamplingParams(max_tokens=1)),
        timeout=30, metadata=md)
    list(call)
    return str(dict(call.initial_metadata())[served])


def set_rollout(gw: GatewayMesh, *, split: str = "random", **changes: float) -> None:
    """Returns once Envoy has taken the change (apply_change waits for it)."""
    apply_change(gw.dep, Rollout(primary="v1", candidate="v2", split=deploy.SplitMode(split),
                                 **changes), gw.run_dir)


# ---- rate limits ----------------------------------------------------------------------------

def test_unknown_or_missing_keys_are_unauthenticated(gw):
    for key in ("", "not-a-key"):
        with Client(gw.config.edge_address, timeout_s=10, api_key=key) as c, \
                pytest.raises(GenmeshError) as err:
            c.generate("hi", max_tokens=1)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "x-api-key" in err.value.message


def test_a_tenant_over_its_local_limit_does_not_affect_another(gw):
    results: dict[str, list[grpc.StatusCode]] = {"alpha": [], "beta": []}
    headers: list[dict] = []
    for _ in range(8):  # alpha's bucket holds 3 per second; beta's 1000
        for tenant in ("alpha", "beta"):
            with grpc.insecure_channel(gw.config.edge_address) as ch:
                call = ch.unary_unary("/genmesh.v1.Generation/ListModels")
                try:
                    call.with_call(b"", timeout=10, metadata=[("x-api-key", KEYS[tenant])])
                    results[tenant].append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    results[tenant].append(exc.code())
                    headers.append(dict(exc.trailing_metadata() or ())
                                   | dict(exc.initial_metadata() or ()))
    assert results["beta"] == [grpc.StatusCode.OK] * 8
    assert results["alpha"].count(grpc.StatusCode.OK) <= 4  # 3, plus a refill if slow
    assert results["alpha"].count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 4
    assert set(results["alpha"]) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert any("x-ratelimit-limit" in h for h in headers), headers
    assert all(h.get("x-genmesh-rate-limited-by") == "local" for h in headers)


@contextmanager
def replica(dep: deploy.Deployment, tmp: Path) -> Iterator[deploy.Deployment]:
    """Another gateway (Envoy) serving ``dep`` on fresh ports, over the mesh's services;
    yields ``dep`` with those ports."""
    edge, mesh, admin = free_ports(3)
    dep = dataclasses.replace(dep, gateway=dataclasses.replace(
        dep.gateway, edge_port=edge, mesh_port=mesh, admin_port=admin))
    xds.apply(dep, tmp / "xds")
    bootstrap = tmp / "envoy.yaml"
    bootstrap.write_text(yaml.safe_dump(dynamic_bootstrap(dep, tmp / "xds"), sort_keys=False))
    # Ready once listening: a replica pointed at a dead rate-limit service never has every
    # cluster healthy.
    envoy = Supervisor([ProcessSpec(
        "envoy-2", tuple(envoy_command(bootstrap, base_id=edge)), f"127.0.0.1:{edge}",
        HttpReady(f"http://127.0.0.1:{admin}/ready"))], run_dir=tmp)
    envoy.start()
    try:
        envoy.wait_ready(timeout_s=30)
        yield dep
    finally:
        envoy.stop()


def edge_of(dep: deploy.Deployment) -> str:
    return f"127.0.0.1:{dep.gateway.edge_port}"


def test_the_global_limit_holds_across_two_gateways(gw, tmp_path):
    with replica(gw.dep, tmp_path) as second:
        wait_for_minute_room(8)
        codes = []
        with gw.client("delta") as one, gw.client("delta", edge_of(second)) as two:
            for i in range(2 * GAMMA_RPM):
                try:
                    (one if i % 2 else two).list_models()
                    codes.append("ok")
                except GenmeshError as exc:
                    codes.append(exc.code.name)
        assert codes.count("ok") == GAMMA_RPM, codes
        assert codes.count("RESOURCE_EXHAUSTED") == GAMMA_RPM


@pytest.mark.parametrize(("mode", "expected"), [("open", "ok"), ("closed", "UNAVAILABLE")])
def test_a_down_rate_limit_service_fails_open_or_closed_per_config(gw, tmp_path, mode,
                                                                   expected):
    [dead] = free_ports(1)
    dep = gw.dep
    dep = dataclasses.replace(
        dep, services=dataclasses.replace(dep.services, ratelimit=(("127.0.0.1", dead),)),
        limits=dataclasses.replace(dep.limits, global_failure_mode=deploy.FailureMode(mode)))
    with replica(dep, tmp_path) as second, gw.client("delta", edge_of(second)) as c:
        try:
            c.list_models()
            outcome = "ok"
        except GenmeshError as exc:
            outcome = exc.code.name
    assert outcome == expected


# ---- token budgets --------------------------------------------------------------------------

def test_concurrent_requests_never_exceed_the_token_budget_and_unused_is_refunded(gw):
    max_tokens = 24

    def one(i: int) -> tuple[str, int]:
        with gw.client("gamma") as c:
            try:
                r = c.generate(f"Say a word about the number {i}.", max_tokens=max_tokens)
            except GenmeshError as exc:
                return exc.code.name, 0
            return "ok", r.usage.prompt_tokens + r.usage.completion_tokens

    # Fixed windows: the 50 calls must fall in one minute's window. They take ~4 s; a run
    # that straddled a boundary anyway (a slow machine) is run again in the next window.
    for _ in range(2):
        wait_for_minute_room(8)
        window = int(time.time()) // 60 * 60
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            results = list(pool.map(one, range(50)))
        if int(time.time()) // 60 * 60 == window:
            break
    else:
        pytest.fail("50 calls took longer than a budget window twice")
    admitted = [used for status, used in results if status == "ok"]
    refused = [status for status, _ in results if status != "ok"]
    print(f"budget {BUDGET}: {len(admitted)} of 50 admitted, {sum(admitted)} tokens used")
    assert admitted and refused
    assert set(refused) == {"RESOURCE_EXHAUSTED"}
    # Each admitted request reserved prompt + 24 tokens; all reservations fit the budget.
    prompt_tokens = min(admitted) - max_tokens  # the prompts are within a token of each other
    assert len(admitted) * (prompt_tokens + max_tokens) <= BUDGET + len(admitted)
    # Every request has ended: what stays charged is exactly what was used.
    client = redis.Redis.from_url(gw.redis_url, decode_responses=True)
    used = int(client.hget(budget_key("gamma", window), "used") or 0)
    client.close()
    assert used == sum(admitted)
    assert used <= BUDGET


# ---- model versions -------------------------------------------------------------------------

def test_pinned_versions_reach_their_pool(gw):
    channel, stub = gw.worker_stub()
    with channel:
        assert generate_direct(stub, pin="v1") == "v1"
        assert generate_direct(stub, pin="v2") == "v2"


def test_canary_split_is_within_three_percent_of_its_weight(gw):
    """The weighted split measured on 2,400 unary GetStats calls, which the catch-all worker
    route splits exactly as the Generate route (gateway/routes.py ``split``), at a fiftieth
    of a generation's cost; and on 150 generations, within 11 points at that count (3 sigma
    either way)."""
    set_rollout(gw, canary_percent=30)
    try:
        channel, stub = gw.worker_stub()

        def stats_version(_: int) -> str:
            return stub.GetStats(worker_pb2.GetStatsRequest(), timeout=30).model_version

        with channel, concurrent.futures.ThreadPoolExecutor(8) as pool:
            versions = list(pool.map(stats_version, range(2400)))
            generated = list(pool.map(lambda _: generate_direct(stub), range(150)))
        share = versions.count("v2") / len(versions)
        generated_share = generated.count("v2") / len(generated)
        print(f"canary 30 %: {share:.3f} of {len(versions)} calls and {generated_share:.3f} "
              f"of {len(generated)} generations to v2")
        assert abs(share - 0.30) <= 0.03, share
        assert abs(generated_share - 0.30) <= 0.11, generated_share
    finally:
        set_rollout(gw)


def test_a_change_is_live_when_it_returns(gw, capsys):
    """apply_change returns once Envoy has taken the change: the very next calls follow
    it, and nothing is printed."""
    channel, stub = gw.worker_stub()
    with channel:
        for percent, version in ((100, "v2"), (0, "v1"), (100, "v2")):
            set_rollout(gw, canary_percent=percent)
            assert {generate_direct(stub) for _ in range(4)} == {version}, percent
    set_rollout(gw)
    assert capsys.readouterr().err == ""


def test_split_by_tenant_is_sticky(gw):
    set_rollout(gw, canary_percent=50, split="tenant")
    try:
        for tenant in ("beta", "gamma"):
            with gw.client(tenant) as c:
                seen = {c.generate("hi", max_tokens=1).model_version for _ in range(6)}
            assert len(seen) == 1, (tenant, seen)
    finally:
        set_rollout(gw)


def test_shadow_gets_its_share_callers_see_only_the_primary_and_a_down_shadow_costs_nothing(gw):
    set_rollout(gw, shadow_percent=25)
    try:
        before = requests_per_version(gw.dep)["v2"]
        channel, stub = gw.worker_stub()
        n = 200  # 9.2 points is 3 sigma of the mirrored share at this count
        with channel, concurrent.futures.ThreadPoolExecutor(8) as pool:
            versions = list(pool.map(lambda _: generate_direct(stub), range(n)))
        assert set(versions) == {"v1"}  # the caller sees only the primary
        time.sleep(1.0)
        mirrored = requests_per_version(gw.dep)["v2"] - before
        print(f"shadow 25 %: {mirrored} of {n} calls mirrored")
        assert abs(mirrored / n - 0.25) <= 0.092, mirrored

        # The shadow's answers are recorded against the primary's, by request id.
        report = compare(read_records(gw.redis_url, 5000))
        assert report["num_pairs"] >= 0.8 * mirrored
        assert 0.0 <= report["token_agreement"] <= 1.0

        # A shadow that hangs costs callers nothing.
        shadow_pid = gw.supervisor.procs["worker-v2"].pid
        os.kill(shadow_pid, signal.SIGSTOP)
        try:
            channel, stub = gw.worker_stub()
            with channel:
                started = time.monotonic()
                for _ in range(20):
                    assert generate_direct(stub) == "v1"
                assert time.monotonic() - started < 10
        finally:
            os.kill(shadow_pid, signal.SIGCONT)
    finally:
        set_rollout(gw)


def test_rollout_changes_under_streaming_load_lose_no_stream(gw):
    stop = threading.Event()
    outcomes: list[str] = []

    def stream_forever() -> None:
        with gw.client("beta") as c:
            while not stop.is_set():
                try:
                    chunks = list(c.generate_stream("Count from one to ten.", max_tokens=24))
                    outcomes.append("finished" if chunks[-1].finish_reason else "no finish")
                except GenmeshError as exc:
                    outcomes.append(exc.code.name)

    threads = [threading.Thread(target=stream_forever) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        for change in ({"canary_percent": 50}, {"canary_percent": 100},
                       {"canary_percent": 50, "shadow_percent": 50}, {}):
            time.sleep(1.0)
            set_rollout(gw, **change)  # the last one is a rollback to v1
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    print(f"rollout under load: {len(outcomes)} streams, {outcomes.count('finished')} finished")
    assert len(outcomes) >= 12
    assert set(outcomes) == {"finished"}, outcomes


def test_promote_then_rollback(gw):
    dep = gw.dep
    promoted = apply_change(dep, Rollout(primary="v2", candidate="v1", previous_primary="v1"),
                            gw.run_dir)
    time.sleep(0.5)
    try:
        with gw.client("beta") as c:
            assert c.generate("hi", max_tokens=1).model_version == "v2"
    finally:
        apply_change(promoted, Rollout(primary="v1", candidate="v2"), gw.run_dir)
    time.sleep(0.5)
    with gw.client("beta") as c:
        assert c.generate("hi", max_tokens=1).model_version == "v1"


def test_the_response_cache_never_serves_the_other_versions_answer(gw):
    prompt = f"Name a fruit. ({uuid.uuid4().hex[:8]})"

    def ask() -> tuple[str, bool]:
        with gw.client("beta") as c:
            r = c.generate(prompt, max_tokens=6)
        return r.model_version, r.usage.response_cached

    assert [ask(), ask()] == [("v1", False), ("v1", True)]
    promoted = apply_change(gw.dep, Rollout(primary="v2", candidate="v1", previous_primary="v1"),
                            gw.run_dir)
    try:
        assert [ask(), ask()] == [("v2", False), ("v2", True)]  # v2's own answer, then kept
    finally:
        apply_change(promoted, Rollout(primary="v1", candidate="v2"), gw.run_dir)
    assert ask() == ("v1", True)  # rolled back: v1's answer, never v2's


def test_an_invalid_change_is_refused_and_traffic_keeps_flowing(gw):
    xds_dir = gw.run_dir / XDS_DIR
    before = {p.name: p.read_text() for p in xds_dir.iterdir()}
    dep = gw.dep
    with pytest.raises(DeploymentError, match="canary_percent"):
        apply_change(dep, Rollout(primary="v1", candidate="v2", canary_percent=150),
                     gw.run_dir)
    with pytest.raises(DeploymentError, match="not a version"):
        apply_change(dep, Rollout(primary="v9"), gw.run_dir)
    # One only Envoy itself rejects: a header limit of 0 KiB.
    bad = dataclasses.replace(dep, gateway=dataclasses.replace(dep.gateway,
                                                               max_request_headers_kb=0))
    with pytest.raises(DeploymentError, match="refused"):
        xds.apply(bad, xds_dir)
    assert {p.name: p.read_text() for p in xds_dir.iterdir()} == before
    assert gw.dep == dep
    with gw.client("beta") as c:
        assert c.generate("hi", max_tokens=2).text is not None


def test_a_shared_prompt_prefix_keeps_reaching_the_same_replica(gw, tmp_path):
    """A replica gateway whose v1 pool has two replicas (the mesh's two real workers):
    calls carrying one prefix key land on one replica; different keys use both."""
    dep = gw.dep
    pool = (*dep.version("v1").workers, *dep.version("v2").workers)
    two_replicas = dataclasses.replace(dep, versions=(
        dataclasses.replace(dep.version("v1"), workers=pool), dep.version("v2")),
        rollout=Rollout(primary="v1"))
    with replica(two_replicas, tmp_path) as second:
        time.sleep(1.5)  # both replicas pass their first health check
        channel = gw.mesh_channel(f"127.0.0.1:{second.gateway.mesh_port}")
        stub = worker_pb2_grpc.WorkerStub(channel)

        def replica_for(key: str) -> str:
            return generate_direct(stub, prefix_key=key, served=metadata.WORKER_ID)

        for key in ("prefix-a", "prefix-b", "prefix-c"):
            assert len({replica_for(key) for _ in range(6)}) == 1, key
        spread = {replica_for(f"prefix-{i}") for i in range(24)}
        channel.close()
        assert spread == {f"{h}:{p}" for h, p in pool}


def test_genmesh_rollout_commands(gw, capsys):
    from genmesh.cli import main as genmesh

    run_dir = ["--run-dir", str(gw.run_dir)]
    assert genmesh(["rollout", *run_dir, "canary", "20"]) == 0
    assert "canary 20%" in capsys.readouterr().out
    assert genmesh(["rollout", *run_dir, "status"]) == 0
    out = capsys.readouterr().out
    assert "v1:" in out and "v2:" in out and "calls since the gateway started" in out
    assert genmesh(["rollout", *run_dir, "canary", "150"]) == 2
    assert "keeps its current rollout" in capsys.readouterr().err
    assert gw.dep.rollout.canary_percent == 20
    assert genmesh(["rollout", *run_dir, "rollback"]) == 0
    assert gw.dep.rollout == Rollout(primary="v1", candidate="v2")
    assert genmesh(["rollout", *run_dir, "report"]) == 0
    assert '"num_pairs"' in capsys.readouterr().out
