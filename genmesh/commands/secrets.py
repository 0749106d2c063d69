"""`genmesh secrets init DIR`: the mesh's CAs, one certificate and key per identity, one
Redis password per service and Redis's ACL file (``genmesh/security/pki.py``), for
docker-compose (``.secrets/``, mounted per service) and Kubernetes (one Secret per
identity, ``deploy/k8s``). Rerunning keeps what is there and still valid, so a running
mesh's certificates stay good; ``--renew`` makes every leaf anew (the CAs are kept).
A directory made with ``--compose`` (files the containers' users can read) stays so when
it is rerun without it; ``--no-compose`` takes them back to 0600.
`genmesh up` needs none of this: it makes its own in its run directory.

`genmesh secrets k8s DIR | kubectl -n genmesh apply -f -`: the Secrets the manifests of
deploy/k8s mount, one per identity holding only its own files (``k8s_secrets``)."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path
from typing import Any

import yaml

from genmesh.security import pki

# The identities that run inside the cluster (the operator's certificate stays outside).
IN_CLUSTER = (pki.GATEWAY, *pki.SERVICES)


def register(sub: argparse._SubParsersAction) -> None:
    secrets = sub.add_parser("secrets", help="the mesh's certificates and Redis passwords")
    actions = secrets.add_subparsers(dest="action", required=True)
    init = actions.add_parser("init", help="make (or complete) a secrets directory")
    init.add_argument("directory", type=Path)
    init.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                      help="a DNS name or IP address every certificate also carries "
                           "(repeatable; default: localhost and 127.0.0.1)")
    init.add_argument("--renew", action="store_true", help="reissue every certificate")
    init.add_argument("--compose", action=argparse.BooleanOptionalAction, default=None,
                      help="keys, passwords and the ACL file readable by the containers' "
                           "users (0644 inside the 0700 directory): docker-compose mounts "
                           "file secrets with their owner and mode on this machine. "
                           "Default: as the directory was made (--no-compose: 0600)")
    init.set_defaults(func=_init)
    k8s = actions.add_parser("k8s", help="print the Kubernetes Secrets of a secrets directory")
    k8s.add_argument("directory", type=Path)
    k8s.add_argument("--namespace", default="genmesh")
    k8s.set_defaults(func=_k8s)


def _init(args: argparse.Namespace) -> int:
    # A rerun keeps a directory made for compose so: files back at 0600 would stop every
    # container that reads them.
    for_compose = (_made_for_compose(pki.Secrets(args.directory)) if args.compose is None
                   else args.compose)
    if args.renew:
        for name in pki.IDENTITIES:
            pki.Secrets(args.directory).cert(name).unlink(missing_ok=True)
    secrets = pki.ensure(args.directory, hosts=args.host or ("localhost", "127.0.0.1"))
    # The directory stays 0700 (and ca/ untouched): only you reach them either way.
    for path in [*(secrets.key(n) for n in pki.IDENTITIES),
                 *(secrets.redis_password_file(u) for u in pki.REDIS_KEYS),
                 secrets.redis_acl]:
        path.chmod(0o644 if for_compose else 0o600)
    print(f"secrets in {secrets.directory}: identities {', '.join(pki.IDENTITIES)}; "
          f"Redis users {', '.join(pki.REDIS_KEYS)}; CA keys in {secrets.directory / 'ca'} "
          "(never mount them); keys and passwords "
          f"{'0644, for docker-compose' if for_compose else '0600'}")
    return 0


def _made_for_compose(secrets: pki.Secrets) -> bool:
    """Whether an earlier ``--compose`` left the keys readable by the containers' users."""
    key = secrets.key(pki.GATEWAY)
    return key.exists() and key.stat().st_mode & 0o044 != 0


def k8s_secrets(secrets: pki.Secrets, namespace: str) -> list[dict[str, Any]]:
    """``genmesh-secrets-<identity>`` for each identity in the cluster: its certificate and
    key, both CAs' certificates and its Redis password if it has one; and
    ``genmesh-redis-acl``, Redis's ACL file. No CA key is in any of them."""
    def secret(name: str, files: dict[str, Path]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/part-of": "genmesh"}},
                "data": {key: base64.b64encode(path.read_bytes()).decode()
                         for key, path in files.items()}}

    out = []
    for name in IN_CLUSTER:
        files = {f"{name}.pem": secrets.cert(name), f"{name}.key": secrets.key(name)}
        for ca in (pki.GATEWAY_CA, pki.SERVICE_CA):
            files[f"{ca}.pem"] = secrets.ca(ca)
        if name in pki.REDIS_KEYS:
            files[secrets.redis_password_file(name).name] = secrets.redis_password_file(name)
        out.append(secret(f"genmesh-secrets-{name}", files))
    out.append(secret("genmesh-redis-acl", {secrets.redis_acl.name: secrets.redis_acl}))
    return out


def _k8s(args: argparse.Namespace) -> int:
    secrets = pki.Secrets(args.directory)
    if not secrets.cert(pki.GATEWAY).exists():
        raise ValueError(f"no secrets in {args.directory}: run `genmesh secrets init "
                         f"{args.directory}` first")
    print(yaml.safe_dump_all(k8s_secrets(secrets, args.namespace), sort_keys=False), end="")
    return 0
