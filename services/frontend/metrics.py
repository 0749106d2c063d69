"""The frontend's Prometheus series: what a client of the mesh sees, per request.

Latency histograms count every request a client saw answered, replays from the response
cache included (labelled with the version whose answer it was); token counters count
inference only, so their rates are the mesh's generation throughput.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds: from a few milliseconds (a cache hit) to minutes (a long generation).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
                     0.3, 0.5, 1.0, 2.5)

REQUESTS = Counter("genmesh_requests", "Requests answered, by how they finished",
                   ["model", "tenant", "method", "finish_reason"])
ERRORS = Counter("genmesh_request_errors", "Requests that failed, by gRPC status",
                 ["model", "tenant", "code"])
TTFT = Histogram("genmesh_time_to_first_token_seconds",
                 "From the request reaching the frontend to its first text",
                 ["model", "version"], buckets=LATENCY_BUCKETS)
ITL = Histogram("genmesh_inter_token_latency_seconds", "Time between generated tokens",
                ["model", "version"], buckets=TOKEN_GAP_BUCKETS)
E2E = Histogram("genmesh_e2e_request_latency_seconds",
                "From the request reaching the frontend to its finish",
                ["model", "version"], buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("genmesh_prompt_tokens", "Prompt tokens of inferred requests",
                        ["model", "tenant"])
GENERATION_TOKENS = Counter("genmesh_generation_tokens", "Tokens generated",
                            ["model", "tenant"])
CACHED_PROMPT_TOKENS = Counter("genmesh_cached_prompt_tokens",
                               "Prompt tokens whose KV came from a worker's prefix cache",
                               ["model", "tenant"])
RESPONSE_CACHE = Counter("genmesh_response_cache_requests",
                         "Response-cache lookups (result: hit, shared, miss, bypass)",
                         ["result"])
BUDGET_USED = Counter("genmesh_budget_tokens_used", "Tokens charged to token budgets",
                      ["tenant"])
BUDGET_LIMIT = Gauge("genmesh_budget_tokens_per_minute", "A tenant's token budget",
                     ["tenant"])
BUDGET_REJECTIONS = Counter("genmesh_budget_rejections",
                            "Requests refused for the tenant's token budget", ["tenant"])
IN_FLIGHT = Gauge("genmesh_requests_in_flight", "Requests running in this frontend",
                  ["method"])
