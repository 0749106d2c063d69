"""gRPC metadata keys the services and the gateway agree on (lower case, as gRPC wants)."""

# The model version a worker serves; the worker sends it as initial metadata, and the
# frontend sets it on worker calls to pin a version (Envoy routes on it).
MODEL_VERSION = "x-genmesh-model-version"
# Envoy's request id (generated at the edge), carried to every service for logs/traces.
REQUEST_ID = "x-request-id"
# The tenant a request belongs to. Only the gateway sets it (from the API key, dropping
# any value a client sent); a frontend with tenants configured refuses calls without it.
TENANT = "x-genmesh-tenant"
# Set by the frontend on worker calls: a hash of the tenant and the prompt's first full
# KV blocks, which Envoy hashes on so a shared prefix reaches the replica that caches it.
PREFIX_KEY = "x-genmesh-prefix-key"
# Set by the frontend on worker calls: a stable number from the tenant, which Envoy uses
# instead of a random draw when the rollout splits by tenant (A/B).
AB_BUCKET = "x-genmesh-ab-bucket"
# Set by the frontend on a worker call whose version the rollout's split already chose (a
# probe through the same route, so the response cache can key on it): Envoy sends the
# call to that version and mirrors it to the shadow as if it had split it itself.
ROUTED_VERSION = "x-genmesh-routed-version"
# Set by a worker on its replies: which replica (host:port) served the call.
WORKER_ID = "x-genmesh-worker"
# Set by Envoy on the copies of worker calls it mirrors to a shadow version: the worker
# records the shadow's output and timings; its reply is thrown away by Envoy.
SHADOW = "x-genmesh-shadow"

# Trailing metadata of a refusal a retry can get past (a token budget's window resets):
# whole seconds to wait, as HTTP's Retry-After. The HTTP API returns it as that header.
RETRY_AFTER = "retry-after"
# The limit that refused a call, as the gateway's refusals carry them (headers there,
# trailing metadata from the frontend's token budget): its value, what is left now, and
# the seconds until it resets.
RATE_LIMIT_LIMIT = "x-ratelimit-limit"
RATE_LIMIT_REMAINING = "x-ratelimit-remaining"
RATE_LIMIT_RESET = "x-ratelimit-reset"
