"""gRPC metadata keys the services and the gateway agree on (lower case, as gRPC wants)."""

# The model version a worker serves; the worker sends it as initial metadata, and the
# frontend sets it on worker calls to pin a version (Envoy routes on it).
MODEL_VERSION = "x-genmesh-model-version"
# Envoy's request id (generated at the edge), carried to every service for logs/traces.
REQUEST_ID = "x-request-id"
