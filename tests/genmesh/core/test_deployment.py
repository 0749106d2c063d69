"""The deployment description's schema: loading, keys from the environment, our own
checks (what Envoy would accept but is still wrong)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from genmesh.core import deployment
from genmesh.core.deployment import DeploymentError, Rollout

LOCAL = Path(__file__).parents[3] / "deploy" / "local.yaml"


def local() -> deployment.Deployment:
    return deployment.load(LOCAL, environ={})


def test_local_deployment_loads_with_keys_from_the_environment():
    assert local().tenants[0].api_keys == ("genmesh-dev-key",)
    dep = deployment.load(LOCAL, environ={"GENMESH_DEV_API_KEY": "s3cret"})
    assert dep.tenants[0].api_keys == ("s3cret",)
    assert [v.name for v in dep.versions] == ["v1", "v2"]
    assert dep.rollout == Rollout(primary="v1", candidate="v2")


def test_request_size_limits_default_and_are_written_in_the_local_deployment():
    assert (deployment.Limits().max_chat_messages, deployment.Limits().max_prompt_chars) == (
        512, 262_144)
    assert (local().limits.max_chat_messages, local().limits.max_prompt_chars) == (512, 262_144)


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "d.yaml"
    deployment.save(local(), path)
    assert deployment.load(path, environ={}) == local()
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: {**d, "rollout": {"primary": "v3"}}, "not a version"),
    (lambda d: {**d, "rollout": {"primary": "v1", "candidate": "v2", "canary_percent": 101}},
     "within 0-100"),
    (lambda d: {**d, "rollout": {"primary": "v1", "shadow_percent": 5}}, "no candidate"),
    (lambda d: {**d, "tenants": {"x": {"api_keys": ["k"], "requests_per_second": 0}}},
     "requests_per_second must be positive"),
    (lambda d: {**d, "tenants": {"x": {"api_keys": ["k"], "requests_per_second": 1},
                                 "y": {"api_keys": ["k"], "requests_per_second": 1}}},
     "share an API key"),
    (lambda d: {**d, "tenants": {"x": {"api_keys": ["${UNSET}"], "requests_per_second": 1}}},
     "empty API key"),
    (lambda d: {**d, "bogus": 1}, "unknown field"),
    (lambda d: {**d, "model": {**d["model"], "versions": {
        "v1": {"workers": ["127.0.0.1:1"], "quantization": "int3"}}}},
     "version v1: quantization must be none, int8 or int4, got 'int3'"),
    (lambda d: {**d, "model": {**d["model"], "versions": {
        "v1": {"workers": ["127.0.0.1:1"], "speculative": "draft"}}}},
     "version v1: speculative draft needs a draft_model"),
    (lambda d: {**d, "model": {**d["model"], "versions": {
        "v1": {"workers": ["127.0.0.1:1"], "speculative": "eagle"}}}},
     "version v1: speculative must be off, ngram or draft, got 'eagle'"),
    (lambda d: {**d, "model": {**d["model"], "versions": {
        "v1": {"workers": ["127.0.0.1:1"], "quantisation": "int4"}}}},
     "unknown field"),
    (lambda d: {**d, "redis_url": None}, "no redis_url"),
    (lambda d: {**d, "limits": {**d["limits"], "max_chat_messages": 0}},
     "limits.max_chat_messages must be positive, got 0"),
    (lambda d: {**d, "limits": {**d["limits"], "max_prompt_chars": 5_000_000}},
     r"limits.max_prompt_chars \(5000000\) is more than gateway.max_request_bytes "
     r"\(4194304\): prompts at the limit could not pass the edge"),
])
def test_invalid_descriptions_are_refused_with_the_reason(tmp_path, change, message):
    data = yaml.safe_load(LOCAL.read_text())
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(change(data)))
    with pytest.raises(DeploymentError, match=message):
        deployment.load(path, environ={})
