"""The HTTP API's Prometheus series (served on ``metrics_port``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("genmesh_http_requests", "HTTP API requests answered, by endpoint and "
                   "status code (a stream counts when it starts)", ["endpoint", "code"])
DURATION = Histogram("genmesh_http_request_duration_seconds", "Time to the response's "
                     "status (a stream's start), by endpoint", ["endpoint"],
                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
TIME_TO_FIRST_BYTE = Histogram("genmesh_http_time_to_first_token_seconds", "Time from a "
                               "streamed request's arrival to its first generated text",
                               ["object"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                    2.5, 5, 10, 30))
IN_FLIGHT = Gauge("genmesh_http_requests_in_flight", "HTTP API requests being answered "
                  "(to the start of a stream)")
