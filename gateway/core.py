"""Values of Envoy's core types shared by the builders: addresses, durations, typed Any."""

from __future__ import annotations

from typing import Any


def duration(seconds: float) -> str:
    """A ``google.protobuf.Duration`` in JSON form: 300 -> "300s", 0.25 -> "0.25s"."""
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {seconds} s")
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")  # nanosecond resolution, no exponent
    return f"{text}s"


def typed(type_name: str, **fields: Any) -> dict[str, Any]:
    """A ``google.protobuf.Any``: the message's fields plus its ``@type`` URL."""
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def socket_address(host: str, port: int) -> dict[str, Any]:
    """An ``envoy.config.core.v3.Address``: a TCP address or DNS name and a port."""
    return {"socket_address": {"address": host, "port_value": port}}
