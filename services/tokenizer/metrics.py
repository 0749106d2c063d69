"""The tokenizer's Prometheus series: calls and time per method (a Detokenize stream
counts each message)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("genmesh_tokenizer_requests", "Tokenizer calls (Detokenize: messages)",
                   ["method"])
LATENCY = Histogram("genmesh_tokenizer_latency_seconds",
                    "Time to answer a call (Detokenize: a message)", ["method"],
                    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                             0.025, 0.05, 0.1, 0.25))
