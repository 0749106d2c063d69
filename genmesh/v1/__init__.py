"""Generated gRPC code for protos/genmesh/v1 (``python -m genmesh.protos``, run by
``make``). Never edited, never committed."""
