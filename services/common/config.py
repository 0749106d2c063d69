"""Every service's configuration is one frozen dataclass, built once at its entry point
from defaults, then ``GENMESH_<SERVICE>_<FIELD>`` environment variables, then flags."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


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
