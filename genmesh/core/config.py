"""Every service's configuration is one frozen dataclass, built once at its entry point
from defaults, then ``GENMESH_<SERVICE>_<FIELD>`` environment variables, then flags.

``ServerConfig`` holds the fields every service has; a service's config subclasses it,
names the service (which gives the variables' prefix and the program name) and sets its
own port. ``services/common/server.py:run_service`` is the entry point that builds it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The fields of every genmesh server. Subclasses set ``SERVICE`` and ``DESCRIPTION``
    and override ``port`` (and ``shutdown_grace_s`` where streams run long)."""

    # The service's name: "tokenizer" reads GENMESH_TOKENIZER_* variables, is the program
    # genmesh-tokenizer in --help and logs as genmesh.tokenizer.
    SERVICE: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""  # one line for --help

    host: str = "127.0.0.1"
    port: int = 0  # each service sets its own default
    shutdown_grace_s: float = 5.0  # how long in-flight calls may finish on SIGTERM
    otlp_endpoint: str = ""  # host:port of an OTLP/gRPC trace collector; "": no tracing
    trace_sample_ratio: float = 1.0  # share of new traces kept (a caller's choice wins)
    metrics_port: int = 0  # the Prometheus endpoint on `host`; 0: none
    log_level: str = "INFO"
    # The mesh's secrets for this service (services/common/tls.py): TLS that only Envoy
    # may call, TLS to Envoy, its own Redis user. "": plaintext, Redis URLs as given.
    secrets_dir: str = ""
    # A plaintext port on 127.0.0.1 answering health alone (the gRPC health service; the
    # HTTP API's GET /healthz), for the probes inside its container, which cannot pass
    # the mutual TLS of `port`; 0: none.
    health_port: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def env_prefix(cls) -> str:
        return f"GENMESH_{cls.SERVICE.upper()}_"

    @classmethod
    def load(cls, argv: list[str] | None, environ: Mapping[str, str]) -> Self:
        """Defaults, overridden by ``GENMESH_<SERVICE>_<FIELD>`` variables, then by flags
        (``--<field-with-dashes>``)."""
        if not cls.SERVICE:
            raise TypeError(f"{cls.__name__} does not name its service (SERVICE)")
        return parse_config(cls, env_prefix=cls.env_prefix(), prog=f"genmesh-{cls.SERVICE}",
                            description=cls.DESCRIPTION, argv=argv, environ=environ)


def parse_config(cls: type[T], *, env_prefix: str, prog: str, description: str,
                 argv: list[str] | None, environ: Mapping[str, str]) -> T:
    """Build ``cls`` (a dataclass whose fields all have defaults of simple types: str,
    int, float, bool or a str Enum) from the environment and the command line."""
    defaults: Any = cls()
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for field in dataclasses.fields(defaults):
        default = getattr(defaults, field.name)
        kind = _parse_bool if isinstance(default, bool) else type(default)
        env = environ.get(env_prefix + field.name.upper())
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=kind,
                            default=kind(env) if env is not None else default,
                            help=f"(env {env_prefix}{field.name.upper()}, default {default!r})")
    return cls(**vars(parser.parse_args(argv)))


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
