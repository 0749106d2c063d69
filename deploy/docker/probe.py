"""Container health checks and Envoy's drain, with the launcher's own probes.

    python deploy/docker/probe.py grpc 127.0.0.1:50051     gRPC health: exit 0 when SERVING
    python deploy/docker/probe.py http http://127.0.0.1:9901/ready    exit 0 on HTTP 200
    python deploy/docker/probe.py http http://127.0.0.1:50055/healthz     (the HTTP API)
    python deploy/docker/probe.py drain http://127.0.0.1:9901 --seconds 15

``drain`` (Envoy's preStop in Kubernetes) asks Envoy to drain its listeners gracefully
(HTTP/2 GOAWAY, so clients reconnect elsewhere) and waits, so streams in flight can end
before the pod's SIGTERM.

The images' HEALTHCHECK, docker-compose's healthchecks and the Kubernetes probes of Envoy
use it; Kubernetes probes the gRPC services natively, and the HTTP API with an httpGet of
its /healthz (200 while it serves, 503 while it drains). Exit status 1 means unhealthy:
any status but 200 (urllib raises on 503), a refused connection or a timeout.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# Runs as a file (`python deploy/docker/probe.py`) from anywhere: the repository's
# packages are found from here, as they are with PYTHONPATH=/app in the images.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from genmesh.launcher.probes import PROBE_TIMEOUT_S, GrpcHealth, HttpReady


def drain(admin_url: str, *, seconds: float) -> bool:
    """Start Envoy's graceful drain of every listener, then wait ``seconds``."""
    request = urllib.request.Request(f"{admin_url}/drain_listeners?graceful", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as reply:
            ok = reply.status == 200
    except (urllib.error.URLError, OSError):
        ok = False
    time.sleep(seconds)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    kinds.add_parser("grpc", help="the standard gRPC health service").add_argument("address")
    kinds.add_parser("http", help="an HTTP endpoint answering 200").add_argument("url")
    drain_p = kinds.add_parser("drain", help="drain Envoy's listeners, then wait")
    drain_p.add_argument("admin_url")
    drain_p.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    if args.kind == "grpc":
        healthy = GrpcHealth(args.address)()
    elif args.kind == "http":
        healthy = HttpReady(args.url)()
    else:
        healthy = drain(args.admin_url, seconds=args.seconds)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
