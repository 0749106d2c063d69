"""Envoy configuration as code: the edge and mesh listeners, the clusters of every service,
rendered to a static bootstrap file, validated by ``envoy --mode validate``."""
