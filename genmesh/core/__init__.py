"""The bottom layer: what the services, the gateway and the CLI all share.

- ``metadata``: the gRPC metadata keys the services and Envoy's routes agree on.
- ``sampling``: defaults every service must read the contract with (``max_tokens`` 0).
- ``failure``: what a limit does when the store it depends on is down.
- ``deployment``: the deployment description's schema, loading and checks.
- ``records``: the generation records a worker writes and ``genmesh rollout report`` reads.
- ``config``: ``ServerConfig``, the fields every service's config has, and how a config is
  built from ``GENMESH_<SERVICE>_<FIELD>`` variables and flags.
- ``models``: the local model store, chat templates, incremental detokenization.

The generated gRPC code (``genmesh.v1``, ``genmesh.rls``) belongs to this layer too; it
stays at the path protoc derives from ``protos/genmesh/...``. Nothing here imports
``services``, ``gateway`` or the CLI (``tests/genmesh/core/test_layering.py``).
"""
