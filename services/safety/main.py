"""Entry point: ``python -m services.safety.main [--flags]`` (or GENMESH_SAFETY_* env)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from genmesh.v1 import safety_pb2, safety_pb2_grpc
from services.common.server import run_service, serve
from services.common.telemetry import settings_from, setup
from services.common.tls import MeshTls, redis_url
from services.safety.audit import AuditLog, AuditStore, JsonlAuditStore, RedisAuditStore
from services.safety.checker import PromptChecker
from services.safety.classifier import load_or_train
from services.safety.config import SafetyConfig
from services.safety.embedding import Embedder
from services.safety.guard import Guard, PolicyFile
from services.safety.prefilter import load_or_build
from services.safety.servicer import SafetyServicer

log = logging.getLogger("genmesh.safety")


def audit_store(cfg: SafetyConfig) -> AuditStore | None:
    if cfg.audit_redis_url:
        return RedisAuditStore(redis_url(cfg, cfg.audit_redis_url),
                               max_records=cfg.audit_max_records)
    if cfg.audit_file:
        return JsonlAuditStore(Path(cfg.audit_file))
    return None


async def run(cfg: SafetyConfig) -> None:
    telemetry = setup(settings_from("genmesh-safety", cfg))
    torch.set_num_threads(max(cfg.num_threads, 1))
    policy_file = PolicyFile(Path(cfg.policy_file))
    # With the classifier the exemplars are never compared with: not encoded (~0.4 s of
    # every start, a restart's outage included).
    embedder = Embedder.load(exemplars_on_use=cfg.classifier) if cfg.embedding else None
    classifier = (load_or_train(embedder, Path(cfg.classifier_cache_dir))
                  if embedder is not None and cfg.classifier else None)
    # The first call pays one-off setup.
    if embedder is not None and classifier is not None:
        embedder.encode_scored([["warm up the classifier"]], classifier)
    elif embedder is not None:
        embedder.similarity("warm up the model")
    # Loaded from the cache (built by `genmesh safety train` and the image); else built in
    # the background while every rule runs.
    prefilter = load_or_build(Path(cfg.classifier_cache_dir), wait=False)
    checker = PromptChecker(embedder, classifier, prefilter=prefilter)
    guard = Guard(policy_file, checker, AuditLog(audit_store(cfg)),
                  max_hold_chars=cfg.max_hold_chars)
    servicer = SafetyServicer(guard, max_text_chars=cfg.max_text_chars)
    log.info("policy loaded", extra={
        "path": cfg.policy_file, "tenants": sorted(policy_file.policies.tenants),
        "embedding": embedder is not None, "classifier": classifier is not None,
        "rule_prefilter": prefilter.ready.is_set(),
        "audit": "redis" if cfg.audit_redis_url else cfg.audit_file or "off"})
    await serve(tls=MeshTls.of(cfg), health_port=cfg.health_port,
                name="genmesh.safety", address=cfg.address,
                register=lambda s: safety_pb2_grpc.add_SafetyServicer_to_server(servicer, s),
                service_names=[safety_pb2.DESCRIPTOR.services_by_name["Safety"].full_name],
                grace_s=cfg.shutdown_grace_s, on_stop=telemetry.flush_after(guard.close),
                interceptors=telemetry.server_interceptors())


def main(argv: list[str] | None = None) -> int:
    return run_service(SafetyConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
