"""The global rate-limit service: Envoy's RLS v3 (``envoy.service.ratelimit.v3``) over
counters in Redis, so one limit is shared by every Envoy replica and every replica of
this service.

- ``limits``: the limits file (envoyproxy/ratelimit's YAML format, a subset), which
  limit a request descriptor matches, and reloading the file when it is replaced.
- ``counters``: fixed windows aligned to the Unix epoch, counted in Redis on Redis's
  clock, one round trip per request.
- ``limiter``: a request's descriptors -> matched limits -> counts -> decisions.
- ``refusal``: what a request over its limit is told: a message naming the limit and
  when its window ends (Envoy's body of the 429), ``x-ratelimit-*`` and ``retry-after``.
- ``servicer``: protos <-> the limiter, errors -> gRPC status codes.

When Redis is down or slow, calls fail with UNAVAILABLE within ``redis_timeout_s``;
Envoy's rate-limit filter then admits the request (fail open, the default) or refuses
it (fail closed: ``failure_mode_deny: true``). Envoy's own ``timeout`` for the call
should be longer than ``redis_timeout_s`` so that Envoy sees our answer, not its own
timeout (both lead to the same failure mode).
"""
