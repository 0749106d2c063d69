"""What a service does when a store its limits depend on (Redis, the rate-limit service)
is down or too slow. One meaning for every limit: the deployment description names it."""

from __future__ import annotations

from enum import StrEnum


class FailureMode(StrEnum):
    OPEN = "open"  # admit the request without the limit, count it, warn
    CLOSED = "closed"  # refuse the request with UNAVAILABLE
