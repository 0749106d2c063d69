"""Entry point: ``python -m services.tokenizer.main [--flags]`` (or GENMESH_TOKENIZER_* env)."""

from __future__ import annotations

import logging
import sys

from genmesh.core.models.store import ModelStore, default_store_root
from genmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.server import run_service, serve
from services.common.telemetry import settings_from, setup
from services.common.tls import MeshTls
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.registry import TokenizerRegistry
from services.tokenizer.servicer import TokenizerServicer

log = logging.getLogger("genmesh.tokenizer")


async def run(cfg: TokenizerConfig) -> None:
    telemetry = setup(settings_from("genmesh-tokenizer", cfg))
    registry = TokenizerRegistry.from_store(ModelStore(default_store_root()), cfg.model_names)
    if not len(registry):
        raise ValueError("no models to serve: set --models")
    for t in registry:
        log.info("loaded tokenizer", extra={"model": t.name, "vocab_size": t.vocab_size,
                                            "has_chat_template": t.chat_template is not None,
                                            "eos_token_ids": list(t.eos_token_ids)})
    servicer = TokenizerServicer(registry, max_text_chars=cfg.max_text_chars,
                                 max_chat_messages=cfg.max_chat_messages)
    await serve(tls=MeshTls.of(cfg), health_port=cfg.health_port,
                name="genmesh.tokenizer", address=cfg.address,
                register=lambda s: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(
                    servicer, s),
                service_names=[tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name],
                grace_s=cfg.shutdown_grace_s, interceptors=telemetry.server_interceptors(),
                on_stop=telemetry.flush)


def main(argv: list[str] | None = None) -> int:
    return run_service(TokenizerConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
