"""Who may call what through the mesh listener (with ``security.mtls``): Envoy's RBAC
filter allows each internal rpc to the service identities that call it, by the URI SAN of
the caller's verified certificate (``genmesh/security/pki.py``). Anything else is refused
with 403, which a gRPC caller reads as PERMISSION_DENIED; a caller without a certificate
of service-ca never gets past the handshake (``gateway/tls.py``).

| path | callers |
| --- | --- |
| ``/genmesh.v1.Tokenizer/``, ``/genmesh.v1.Worker/``, ``/genmesh.v1.Safety/`` | frontend |
| ``/genmesh.v1.Cache/`` (Lookup, Store, Release, ...) | frontend |
| ``/genmesh.v1.Cache/Invalidate``, ``/genmesh.v1.Cache/GetStats`` | frontend, operator |
| ``/genmesh.v1.Worker/GetStats`` | frontend, operator |
| ``/genmesh.v1.Generation/`` (to the frontend: the HTTP API's calls) | httpapi |

The operator is the identity of `genmesh` commands run beside the mesh (``genmesh cache``).
The HTTP API reaches the frontend through here, not directly: a frontend accepts only
Envoy, so the tenant header it trusts was set by the edge's key check or passed on by the
HTTP API, never by another caller.
"""

from __future__ import annotations

from typing import Any

from gateway.core import typed
from genmesh.security import pki

RBAC_FILTER = "envoy.filters.http.rbac"

# A service's path prefix (ending "/") or one method's exact path -> identities; a call is
# allowed when any entry matching its path names its caller.
MESH_CALLERS: dict[str, tuple[str, ...]] = {
    "/genmesh.v1.Tokenizer/": ("frontend",),
    "/genmesh.v1.Worker/": ("frontend",),
    "/genmesh.v1.Worker/GetStats": ("operator",),
    "/genmesh.v1.Safety/": ("frontend",),
    "/genmesh.v1.Cache/": ("frontend",),
    "/genmesh.v1.Cache/Invalidate": ("operator",),
    "/genmesh.v1.Cache/GetStats": ("operator",),
    "/genmesh.v1.Generation/": ("httpapi",),
}


def _matches(entry: str, path: str) -> bool:
    return path.startswith(entry) if entry.endswith("/") else path == entry


def allowed(path: str) -> set[str]:
    """The identities MESH_CALLERS lets call ``path`` (what the filter enforces)."""
    return {who for entry, callers in MESH_CALLERS.items() if _matches(entry, path)
            for who in callers}


def mesh_rbac_filter() -> dict[str, Any]:
    def policy(entry: str, callers: tuple[str, ...]) -> dict[str, Any]:
        match = {"prefix": entry} if entry.endswith("/") else {"exact": entry}
        return {"permissions": [{"url_path": {"path": match}}],
                "principals": [{"authenticated": {"principal_name": {
                    "exact": pki.spiffe_id(who)}}} for who in callers]}

    return {"name": RBAC_FILTER, "typed_config": typed(
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        rules={"action": "ALLOW", "policies": {
            entry: policy(entry, callers) for entry, callers in MESH_CALLERS.items()}})}
