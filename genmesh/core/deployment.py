"""The deployment description: one YAML file (``deploy/*.yaml``) that says what runs where.

It names the services and their addresses, the model's versions as worker pools, the
tenants with their API keys and limits, and the rollout state (which version is primary,
the canary's share, the shadow's share). ``gateway/`` renders it into Envoy's bootstrap and
xDS files; the frontend reads its tenants' token budgets; ``genmesh rollout`` edits its
rollout state on a running mesh.

API keys may be written as ``${VAR}`` or ``${VAR:-default}``: they are read from the
environment when the file is loaded, so a file in git need not hold a real key.

``check`` finds what Envoy itself would accept but is still wrong (a version with no
workers, weights out of range, a limit of zero): ``load`` refuses such a file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from genmesh.core.failure import FailureMode

# (host, port) of one backend process. The host is an IP address or a DNS name.
Endpoint = tuple[str, int]


class DeploymentError(ValueError):
    """A deployment description that cannot be served; the message says what to fix."""


class SplitMode(StrEnum):
    RANDOM = "random"  # each request independently: canary_percent of requests
    TENANT = "tenant"  # by a stable hash of the tenant: canary_percent of tenants, sticky


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    host: str = "127.0.0.1"  # where Envoy listens; 0.0.0.0 inside a container
    edge_port: int = 8080  # public listener: what clients dial
    mesh_port: int = 8081  # service-to-service listener: what the frontend dials
    admin_port: int = 9901  # admin interface (GET /ready, /stats, /clusters); no auth
    # Where the admin interface listens, an IP address. It has no authentication:
    # POST /quitquitquit stops Envoy (its /config_dump holds no key), so keep it on
    # loopback and let others reach the metrics listener instead.
    admin_host: str = "127.0.0.1"
    # A listener on `host` serving only admin's GET /stats/prometheus and GET /ready (for
    # Prometheus and readiness probes from outside the host or pod); 0: none.
    metrics_port: int = 0
    # A call with no message in either direction for this long is reset (both listeners).
    stream_idle_timeout_s: float = 300.0
    # Most bytes a client may send on one edge call (all messages of a bidi stream).
    max_request_bytes: int = 4 * 1024 * 1024
    max_request_headers_kb: int = 60  # request headers + gRPC metadata, both listeners
    max_downstream_connections: int = 10_000  # open client connections, all listeners
    access_log: bool = True  # one JSON line per call on Envoy's stdout


@dataclass(frozen=True, slots=True)
class Services:
    """Addresses of the services other than the workers; empty: not deployed."""

    frontend: tuple[Endpoint, ...]
    tokenizer: tuple[Endpoint, ...]
    ratelimit: tuple[Endpoint, ...] = ()  # Envoy's global rate-limit service (RLS v3)
    safety: tuple[Endpoint, ...] = ()
    cache: tuple[Endpoint, ...] = ()
    # The OpenAI-compatible HTTP API (services/httpapi, HTTP/1.1); the edge routes /v1/ to it.
    httpapi: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelVersion:
    name: str  # e.g. "v1"; the worker cluster is "worker-<name>"
    workers: tuple[Endpoint, ...]  # the replicas serving this version
    dtype: str = "bfloat16"  # what the local launcher starts the worker with
    # Weight-only quantization the launcher starts the worker with: none, int8, int4.
    quantization: str = "none"
    # Speculative decoding: off, ngram, or draft (draft_model proposes: a store name
    # sharing the model's tokenizer, or the model itself with draft_quantization int4).
    speculative: str = "off"
    draft_model: str = ""
    draft_quantization: str = "none"

    @property
    def cluster(self) -> str:
        return f"worker-{self.name}"


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    api_keys: tuple[str, ...]  # any of these, in the API key header, is this tenant
    requests_per_second: int  # edge limit per gateway replica (Envoy's local token bucket)
    requests_per_minute: int | None = None  # shared by all replicas (global); None: none
    tokens_per_minute: int | None = None  # prompt + max_tokens budget; None: unlimited


@dataclass(frozen=True, slots=True)
class Rollout:
    primary: str  # the version that serves by default
    candidate: str | None = None  # the version being rolled out, if any
    canary_percent: float = 0.0  # share of worker traffic sent to the candidate, 0-100
    split: SplitMode = SplitMode.RANDOM
    shadow_percent: float = 0.0  # share of Generate calls mirrored to the candidate, 0-100
    previous_primary: str | None = None  # set by promote: what rollback goes back to


@dataclass(frozen=True, slots=True)
class Limits:
    api_key_header: str = "x-api-key"
    # Envoy cannot reach the rate-limit service (or it cannot reach Redis).
    global_failure_mode: FailureMode = FailureMode.OPEN
    # The frontend cannot reach Redis to reserve a token budget.
    budget_failure_mode: FailureMode = FailureMode.CLOSED
    # The safety service is down or slower than safety_timeout_s: when checking a prompt
    # (closed: refuse with UNAVAILABLE; open: serve it unchecked), and when moderating
    # the output (closed: end the stream with UNAVAILABLE; open: stream it unmoderated).
    safety_prompt_failure_mode: FailureMode = FailureMode.CLOSED
    safety_output_failure_mode: FailureMode = FailureMode.CLOSED
    safety_timeout_s: float = 2.0  # longest wait for a prompt check or a moderated chunk
    # The response cache (services.cache): answers kept this long, in at most this much
    # memory (least recently used out first); a lookup or store slower than the timeout
    # is skipped, and the request runs without the cache.
    cache_ttl_s: int = 3600
    cache_max_memory_mb: int = 256
    cache_timeout_s: float = 0.25
    # Async jobs (Redis): a job whose frontend sent no heartbeat this long is taken over;
    # a job's record and result are kept this long after it ends.
    job_claim_timeout_s: float = 30.0
    job_result_ttl_s: int = 86_400
    max_running_jobs: int = 4  # jobs one frontend runs at once
    max_batch_inflight: int = 8  # requests of one GenerateBatch stream running at once
    # The size of one request, refused by the frontend (INVALID_ARGUMENT naming the limit)
    # before any downstream call: messages of a chat (history and system prompt
    # included), and characters of a prompt or of all a chat's messages. 256 Ki
    # characters are at most 1 MiB of UTF-8, well inside the edge's max_request_bytes,
    # and ~64k tokens of prose: more than most models' context, which the worker checks
    # once the tokens are known. The tokenizer and safety services have bounds of their
    # own (their --max-* flags), at least these by default.
    max_chat_messages: int = 512
    max_prompt_chars: int = 256 * 1024


@dataclass(frozen=True, slots=True)
class Observability:
    # host:port of an OTLP/gRPC trace collector (Jaeger, an OpenTelemetry Collector):
    # Envoy's listeners and every service export spans there; "": no tracing, no cost.
    otlp_endpoint: str = ""
    trace_sample_percent: float = 100.0  # share of new traces kept, 0-100
    # What an hour of a worker's device costs (USD): the workers estimate each request's
    # cost from its share of the device's time; 0: no cost estimate.
    price_per_device_hour: float = 0.0


@dataclass(frozen=True, slots=True)
class Security:
    """Who may call whom inside the mesh (README "Authentication")."""

    # Mutual TLS between Envoy and every service, both ways; each internal rpc callable
    # only by the identities allowed it (gateway/rbac.py); Redis users per service. The
    # certificates and passwords come from `secrets_dir` (genmesh/security/pki.py).
    mtls: bool = False
    # Where Envoy reads its certificate, its key and the CAs' certificates: `genmesh up`
    # sets its run directory's; compose and Kubernetes mount a secret there.
    secrets_dir: str = ""


@dataclass(frozen=True, slots=True)
class Deployment:
    model: str  # the served model's name
    versions: tuple[ModelVersion, ...]
    rollout: Rollout
    services: Services
    tenants: tuple[Tenant, ...] = ()
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    limits: Limits = field(default_factory=Limits)
    observability: Observability = field(default_factory=Observability)
    security: Security = field(default_factory=Security)
    redis_url: str | None = None  # counters, budgets, rollout records; None: none of them
    # The worker route hashes the prompt's first full KV blocks (this many, of this many
    # tokens) so prompts sharing a prefix reach the replica that caches it.
    prefix_affinity_blocks: int = 4
    kv_block_size: int = 16

    def version(self, name: str) -> ModelVersion:
        for v in self.versions:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.versions)
        raise DeploymentError(f"unknown model version {name!r}; this deployment has: {known}")

    def tenant(self, name: str) -> Tenant | None:
        return next((t for t in self.tenants if t.name == name), None)

    def with_rollout(self, rollout: Rollout) -> Deployment:
        return dataclasses.replace(self, rollout=rollout)


def check(dep: Deployment) -> list[str]:
    """Everything wrong with ``dep`` that Envoy would not catch; empty when it can serve."""
    problems: list[str] = []
    names = [v.name for v in dep.versions]
    if not names:
        problems.append("the model has no versions")
    if len(set(names)) != len(names):
        problems.append(f"model version names repeat: {names}")
    for v in dep.versions:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v.name):
            problems.append(f"version name {v.name!r}: use letters, digits, '.', '_', '-'")
        if not v.workers:
            problems.append(f"version {v.name} has no workers")
        if v.quantization not in ("none", "int8", "int4"):
            problems.append(f"version {v.name}: quantization must be none, int8 or int4, "
                            f"got {v.quantization!r}")
        if v.speculative not in ("off", "ngram", "draft"):
            problems.append(f"version {v.name}: speculative must be off, ngram or draft, "
                            f"got {v.speculative!r}")
        if v.speculative == "draft" and not v.draft_model:
            problems.append(f"version {v.name}: speculative draft needs a draft_model "
                            "(the model itself with draft_quantization int4 will do)")
        if v.draft_quantization not in ("none", "int8", "int4"):
            problems.append(f"version {v.name}: draft_quantization must be none, int8 or "
                            f"int4, got {v.draft_quantization!r}")
    r = dep.rollout
    for role, name in (("primary", r.primary), ("candidate", r.candidate),
                       ("previous_primary", r.previous_primary)):
        if name is not None and name not in names:
            problems.append(f"rollout {role} {name!r} is not a version of the model "
                            f"(versions: {', '.join(names)})")
    if r.candidate is not None and r.candidate == r.primary:
        problems.append(f"rollout candidate and primary are both {r.primary}")
    for what, share in (("canary_percent", r.canary_percent), ("shadow_percent", r.shadow_percent)):
        if not 0.0 <= share <= 100.0:
            problems.append(f"rollout {what} must be within 0-100, got {share}")
        elif share > 0 and r.candidate is None:
            problems.append(f"rollout {what} is {share} but there is no candidate version")
    if not dep.services.frontend:
        problems.append("services.frontend has no address")
    if not dep.services.tokenizer:
        problems.append("services.tokenizer has no address")
    o = dep.observability
    if o.otlp_endpoint:
        try:
            parse_endpoint(o.otlp_endpoint)
        except DeploymentError as exc:
            problems.append(f"observability.otlp_endpoint: {exc}")
    if not 0 <= o.trace_sample_percent <= 100:
        problems.append(f"observability.trace_sample_percent must be 0-100, got "
                        f"{o.trace_sample_percent}")
    if o.price_per_device_hour < 0:
        problems.append(f"observability.price_per_device_hour must be >= 0, got "
                        f"{o.price_per_device_hour}")
    for name in ("cache_ttl_s", "cache_max_memory_mb", "cache_timeout_s", "job_claim_timeout_s",
                 "job_result_ttl_s", "max_running_jobs", "max_batch_inflight",
                 "max_chat_messages", "max_prompt_chars"):
        if getattr(dep.limits, name) <= 0:
            problems.append(f"limits.{name} must be positive, got {getattr(dep.limits, name)}")
    if dep.limits.max_prompt_chars > dep.gateway.max_request_bytes:
        problems.append(f"limits.max_prompt_chars ({dep.limits.max_prompt_chars}) is more than "
                        f"gateway.max_request_bytes ({dep.gateway.max_request_bytes}): prompts "
                        "at the limit could not pass the edge")
    if dep.limits.safety_timeout_s <= 0:
        problems.append(f"limits.safety_timeout_s must be positive, got "
                        f"{dep.limits.safety_timeout_s}")
    keys: dict[str, str] = {}
    tenant_names = [t.name for t in dep.tenants]
    if len(set(tenant_names)) != len(tenant_names):
        problems.append(f"tenant names repeat: {tenant_names}")
    for t in dep.tenants:
        if not t.api_keys:
            problems.append(f"tenant {t.name} has no API key")
        for key in t.api_keys:
            if not key:
                problems.append(f"tenant {t.name} has an empty API key (an unset variable?)")
            elif key in keys:
                problems.append(f"tenants {keys[key]} and {t.name} share an API key")
            keys[key] = t.name
        for what, value in (("requests_per_second", t.requests_per_second),
                            ("requests_per_minute", t.requests_per_minute),
                            ("tokens_per_minute", t.tokens_per_minute)):
            if value is not None and value <= 0:
                problems.append(f"tenant {t.name}: {what} must be positive, got {value}")
        if t.requests_per_minute is not None and not dep.services.ratelimit:
            problems.append(f"tenant {t.name} has requests_per_minute (a global limit) but "
                            "services.ratelimit has no address")
        if t.tokens_per_minute is not None and dep.redis_url is None:
            problems.append(f"tenant {t.name} has tokens_per_minute but no redis_url is set")
    if dep.prefix_affinity_blocks < 0 or dep.kv_block_size <= 0:
        problems.append("prefix_affinity_blocks must be >= 0 and kv_block_size > 0")
    g = dep.gateway
    ports = [g.edge_port, g.mesh_port, g.admin_port]
    if g.metrics_port:  # 0: no metrics listener
        ports.append(g.metrics_port)
    if len(set(ports)) != len(ports):
        problems.append(f"gateway edge, mesh, admin and metrics ports must differ, got {ports}")
    if not _is_ip_address(g.admin_host):
        problems.append(f"gateway admin_host must be an IP address (Envoy's admin resolves no "
                        f"names), got {g.admin_host!r}")
    if g.max_request_bytes <= 0:
        problems.append(f"gateway max_request_bytes must be positive, got {g.max_request_bytes}")
    return problems


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def require_valid(dep: Deployment) -> Deployment:
    problems = check(dep)
    if problems:
        raise DeploymentError("invalid deployment: " + "; ".join(problems))
    return dep


# ---- YAML <-> Deployment ------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(text: str, environ: Mapping[str, str]) -> str:
    """``${VAR}`` and ``${VAR:-default}`` from ``environ``; an unset VAR without default is ""."""
    return _VAR.sub(lambda m: environ.get(m.group(1), m.group(2) or ""), text)


def parse_endpoint(text: str) -> Endpoint:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DeploymentError(f"address {text!r} must be host:port")
    return host, int(port)


def format_endpoint(endpoint: Endpoint) -> str:
    return f"{endpoint[0]}:{endpoint[1]}"


def from_dict(data: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Deployment:
    """A Deployment from parsed YAML; DeploymentError naming the bad field."""
    env = os.environ if environ is None else environ
    try:
        return require_valid(_from_dict(data, env))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DeploymentError):
            raise
        raise DeploymentError(f"invalid deployment: {type(exc).__name__}: {exc}") from None


def _from_dict(data: Mapping[str, Any], env: Mapping[str, str]) -> Deployment:
    _known(data, "deployment", {"model", "services", "rollout", "tenants", "gateway", "limits",
                                "observability", "security", "redis_url"})
    model = data["model"]
    _known(model, "model", {"name", "versions", "prefix_affinity_blocks", "kv_block_size"})
    for name, spec in (model.get("versions") or {}).items():
        _known(spec, f"version {name}",
               {f.name for f in dataclasses.fields(ModelVersion)} - {"name"})
    versions = tuple(
        ModelVersion(str(name), tuple(parse_endpoint(a) for a in spec.get("workers", ())),
                     dtype=str(spec.get("dtype", "bfloat16")),
                     quantization=str(spec.get("quantization", "none")),
                     speculative=str(spec.get("speculative", "off")),
                     draft_model=str(spec.get("draft_model", "")),
                     draft_quantization=str(spec.get("draft_quantization", "none")))
        for name, spec in (model.get("versions") or {}).items())
    services = data["services"]
    _known(services, "services", {f.name for f in dataclasses.fields(Services)})
    svc = Services(**{name: tuple(parse_endpoint(a) for a in addresses or ())
                      for name, addresses in services.items()})
    rollout = dict(data.get("rollout") or {})
    _known(rollout, "rollout", {f.name for f in dataclasses.fields(Rollout)})
    if "split" in rollout:
        rollout["split"] = SplitMode(rollout["split"])
    for share in ("canary_percent", "shadow_percent"):
        if share in rollout:
            rollout[share] = float(rollout[share])
    tenants = []
    for name, spec in (data.get("tenants") or {}).items():
        _known(spec, f"tenant {name}", {f.name for f in dataclasses.fields(Tenant)} - {"name"})
        keys = tuple(expand(str(k), env) for k in spec.get("api_keys", ()))
        tenants.append(Tenant(str(name), keys, int(spec["requests_per_second"]),
                              _opt_int(spec.get("requests_per_minute")),
                              _opt_int(spec.get("tokens_per_minute"))))
    limits = dict(data.get("limits") or {})
    _known(limits, "limits", {f.name for f in dataclasses.fields(Limits)})
    for mode in ("global_failure_mode", "budget_failure_mode", "safety_prompt_failure_mode",
                 "safety_output_failure_mode"):
        if mode in limits:
            limits[mode] = FailureMode(limits[mode])
    for seconds in ("safety_timeout_s", "cache_timeout_s", "job_claim_timeout_s"):
        if seconds in limits:
            limits[seconds] = float(limits[seconds])
    gateway = dict(data.get("gateway") or {})
    _known(gateway, "gateway", {f.name for f in dataclasses.fields(GatewaySettings)})
    observability = dict(data.get("observability") or {})
    _known(observability, "observability",
           {f.name for f in dataclasses.fields(Observability)})
    for number in ("trace_sample_percent", "price_per_device_hour"):
        if number in observability:
            observability[number] = float(observability[number])
    if "otlp_endpoint" in observability:
        observability["otlp_endpoint"] = expand(str(observability["otlp_endpoint"] or ""), env)
    security = dict(data.get("security") or {})
    _known(security, "security", {f.name for f in dataclasses.fields(Security)})
    if "secrets_dir" in security:
        security["secrets_dir"] = expand(str(security["secrets_dir"] or ""), env)
    return Deployment(
        security=Security(mtls=bool(security.get("mtls", False)),
                          secrets_dir=str(security.get("secrets_dir", ""))),
        model=str(model["name"]), versions=versions, rollout=Rollout(**rollout), services=svc,
        tenants=tuple(tenants), gateway=GatewaySettings(**gateway), limits=Limits(**limits),
        observability=Observability(**observability), redis_url=data.get("redis_url"),
        prefix_affinity_blocks=int(model.get("prefix_affinity_blocks", 4)),
        kv_block_size=int(model.get("kv_block_size", 16)))


def to_dict(dep: Deployment) -> dict[str, Any]:
    """The YAML form of ``dep`` (API keys as loaded, i.e. expanded)."""
    def addresses(endpoints: tuple[Endpoint, ...]) -> list[str]:
        return [format_endpoint(e) for e in endpoints]

    rollout = {k: (str(v) if isinstance(v, StrEnum) else v)
               for k, v in dataclasses.asdict(dep.rollout).items()}
    limits = {k: (str(v) if isinstance(v, StrEnum) else v)
              for k, v in dataclasses.asdict(dep.limits).items()}
    return {
        "model": {"name": dep.model, "prefix_affinity_blocks": dep.prefix_affinity_blocks,
                  "kv_block_size": dep.kv_block_size,
                  "versions": {v.name: {"workers": addresses(v.workers), "dtype": v.dtype,
                                        "quantization": v.quantization,
                                        "speculative": v.speculative,
                                        "draft_model": v.draft_model,
                                        "draft_quantization": v.draft_quantization}
                               for v in dep.versions}},
        "services": {f.name: addresses(getattr(dep.services, f.name))
                     for f in dataclasses.fields(Services)},
        "rollout": rollout,
        "tenants": {t.name: {"api_keys": list(t.api_keys),
                             "requests_per_second": t.requests_per_second,
                             "requests_per_minute": t.requests_per_minute,
                             "tokens_per_minute": t.tokens_per_minute} for t in dep.tenants},
        "gateway": dataclasses.asdict(dep.gateway),
        "limits": limits,
        "observability": dataclasses.asdict(dep.observability),
        "security": dataclasses.asdict(dep.security),
        "redis_url": dep.redis_url,
    }


def load(path: Path, environ: Mapping[str, str] | None = None) -> Deployment:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DeploymentError(f"cannot read the deployment {path}: {exc}") from None
    if not isinstance(data, Mapping):
        raise DeploymentError(f"{path}: a deployment is a YAML mapping")
    try:
        return from_dict(data, environ)
    except DeploymentError as exc:
        raise DeploymentError(f"{path}: {exc}") from None


def save(dep: Deployment, path: Path) -> None:
    """Write ``dep`` atomically, readable by the owner only (it holds API keys)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(to_dict(dep), f, sort_keys=False)
    os.replace(tmp, path)


def _known(section: Any, where: str, allowed: set[str]) -> None:
    if not isinstance(section, Mapping):
        raise DeploymentError(f"{where} must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise DeploymentError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(allowed))}")


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
