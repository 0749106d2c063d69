"""The mesh listener's RBAC (gateway/rbac.py): the table of who calls what, and the
filter Envoy gets from it."""

from __future__ import annotations

from gateway import rbac
from genmesh.security import pki


def test_internal_rpcs_are_the_frontends_and_admin_rpcs_the_operators_too():
    assert rbac.allowed("/genmesh.v1.Worker/Generate") == {"frontend"}
    assert rbac.allowed("/genmesh.v1.Worker/GetStats") == {"frontend", "operator"}
    assert rbac.allowed("/genmesh.v1.Cache/Store") == {"frontend"}
    assert rbac.allowed("/genmesh.v1.Cache/Invalidate") == {"frontend", "operator"}
    # A method's entry is its exact path, never a prefix of another method's.
    assert rbac.allowed("/genmesh.v1.Cache/InvalidateAll") == {"frontend"}
    assert rbac.allowed("/genmesh.v1.Tokenizer/Tokenize") == {"frontend"}
    assert rbac.allowed("/genmesh.v1.Safety/CheckPrompt") == {"frontend"}
    assert rbac.allowed("/genmesh.v1.Generation/Generate") == {"httpapi"}
    assert rbac.allowed("/grpc.reflection.v1.ServerReflection/Info") == set()
    assert rbac.allowed("/envoy.service.auth.v3.Authorization/Check") == set()


def test_the_filter_allows_exactly_the_table_by_uri_san():
    config = rbac.mesh_rbac_filter()["typed_config"]
    assert config["rules"]["action"] == "ALLOW"
    policies = config["rules"]["policies"]
    assert set(policies) == set(rbac.MESH_CALLERS)
    worker = policies["/genmesh.v1.Worker/"]
    assert worker["permissions"] == [{"url_path": {"path": {"prefix": "/genmesh.v1.Worker/"}}}]
    assert worker["principals"] == [{"authenticated": {"principal_name": {
        "exact": pki.spiffe_id("frontend")}}}]
    assert policies["/genmesh.v1.Cache/Invalidate"]["permissions"] == [
        {"url_path": {"path": {"exact": "/genmesh.v1.Cache/Invalidate"}}}]
