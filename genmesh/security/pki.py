"""The mesh's secrets: two certificate authorities, one certificate per identity, and one
Redis password per service, made with ``cryptography`` (``genmesh secrets init``, and
``genmesh up`` into its run directory).

Two CAs make "a service accepts only Envoy" a property of the TLS handshake itself:
- ``gateway-ca`` signs Envoy's certificate alone. Every service trusts it, and only it,
  for its callers: a service's port completes a handshake with Envoy and nothing else
  (a plaintext call, another service, a certificate of any other CA: refused).
- ``service-ca`` signs the services' certificates (and the operator's, for `genmesh`
  commands). Envoy trusts it on the mesh listener and towards its upstreams, and names the
  identity it must see: its RBAC filter allows each internal rpc to the identities that
  may call it (``gateway/rbac.py``), and each upstream cluster checks that the endpoint
  is the service it should be.

An identity is its certificate's URI SAN, ``spiffe://genmesh.local/<name>`` (what Envoy's
RBAC matches), and its common name. Every certificate also carries the DNS name
``<name>.genmesh.internal``, which clients name as the TLS target wherever they dial
(``target_name``), so one certificate serves on loopback, in compose and on Kubernetes.

Files (``Secrets`` reads them; a service or container gets only its own and the CAs'
certificates, never a CA key):
    gateway-ca.pem, service-ca.pem        the CAs' certificates
    <name>.pem, <name>.key                each identity's certificate and key (0600)
    redis-<user>.password                 each Redis user's password (0600)
    redis-users.acl                       Redis's ACL file: users, hashed passwords, keys
    ca/gateway-ca.key, ca/service-ca.key  the CAs' keys (0600), kept for reissuing

Keys are ECDSA P-256: a handshake costs a fraction of an RSA one, and connections are
long-lived HTTP/2 anyway (the cost per token is the record encryption, measured by
``genmesh bench mesh --mtls``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "genmesh.local"
DNS_SUFFIX = "genmesh.internal"
GATEWAY = "envoy"  # the one identity gateway-ca signs
OPERATOR = "operator"  # `genmesh` commands that call the mesh (cache invalidation, records)
# Every service identity; a worker's replicas (every version) share "worker".
SERVICES = ("frontend", "tokenizer", "safety", "cache", "worker", "ratelimit", "httpapi")
IDENTITIES = (GATEWAY, *SERVICES, OPERATOR)
GATEWAY_CA = "gateway-ca"
SERVICE_CA = "service-ca"

# Which keys each Redis user may touch (ACL key patterns; channels are not used). The
# commands: everything but @dangerous (KEYS, FLUSHALL, CONFIG, DEBUG, ACL, ...).
REDIS_KEYS: dict[str, tuple[str, ...]] = {
    "frontend": ("genmesh:budget:*", "genmesh:jobs:*", "genmesh:jobs"),
    "cache": ("genmesh:cache:*", "genmesh:cache"),
    "safety": ("genmesh:safety:*",),
    "worker": ("genmesh:rollout:*",),
    "ratelimit": ("genmesh:rl:*",),
    "operator": ("genmesh:*",),
}

CA_DAYS = 3650
LEAF_DAYS = 90
RENEW_WITHIN = dt.timedelta(days=7)  # a leaf expiring sooner is reissued


def spiffe_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{name}"


def target_name(name: str) -> str:
    """The DNS name in ``name``'s certificate that a client names as its TLS target."""
    return f"{name}.{DNS_SUFFIX}"


@dataclass(frozen=True, slots=True)
class Secrets:
    """A directory of the files above, as one process reads it (its own identity's)."""

    directory: Path

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def ca(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def redis_password_file(self, user: str) -> Path:
        return self.directory / f"redis-{user}.password"

    def redis_password(self, user: str) -> str:
        return self.redis_password_file(user).read_text().strip()

    @property
    def redis_acl(self) -> Path:
        return self.directory / "redis-users.acl"

    def read(self, name: str) -> tuple[bytes, bytes]:
        """``name``'s (private key, certificate chain) in PEM."""
        return self.key(name).read_bytes(), self.cert(name).read_bytes()


def login(url: str, secrets: Secrets, user: str) -> str:
    """``url`` logging in to Redis as ``user`` with its password from ``secrets``; as it
    was when it names a user already or the secrets hold no password for ``user``."""
    if not url or not secrets.redis_password_file(user).exists():
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        return url
    password = urllib.parse.quote(secrets.redis_password(user), safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.netloc}"))


def ensure(directory: Path, identities: Iterable[str] = IDENTITIES, *,
           hosts: Iterable[str] = ("localhost", "127.0.0.1"),
           now: dt.datetime | None = None) -> Secrets:
    """``directory`` holding valid secrets for ``identities``: what is there and still
    valid is kept (a running mesh's certificates stay good), what is missing, expiring
    within RENEW_WITHIN, signed by another CA or not of its key file's key is made anew.
    ``hosts``: DNS names and IP addresses put in every certificate besides its identity's
    own names."""
    now = now or dt.datetime.now(dt.UTC)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    (directory / "ca").mkdir(exist_ok=True)
    out = Secrets(directory)
    cas = {ca: _ensure_ca(directory, ca, now) for ca in (GATEWAY_CA, SERVICE_CA)}
    hosts = tuple(hosts)
    for name in identities:
        ca_key, ca_cert = cas[GATEWAY_CA if name == GATEWAY else SERVICE_CA]
        if not _is_valid_leaf(out.cert(name), out.key(name), ca_cert, now):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _leaf(name, key, ca_key, ca_cert, hosts, now)
            _write(out.key(name), _key_pem(key), private=True)
            _write(out.cert(name), cert.public_bytes(serialization.Encoding.PEM))
    for user in REDIS_KEYS:
        if not out.redis_password_file(user).exists():
            _write(out.redis_password_file(user), secrets.token_urlsafe(32) + "\n",
                   private=True)
    _write(out.redis_acl, redis_acl({u: out.redis_password(u) for u in REDIS_KEYS}),
           private=True)
    return out


def redis_acl(passwords: dict[str, str]) -> str:
    """Redis's ACL file: the default user off, one user per service with only its keys."""
    lines = ["user default off"]
    for user, password in passwords.items():
        digest = hashlib.sha256(password.encode()).hexdigest()
        patterns = " ".join(f"~{p}" for p in REDIS_KEYS[user])
        lines.append(f"user {user} on #{digest} resetkeys {patterns} resetchannels "
                     "+@all -@dangerous")
    return "\n".join(lines) + "\n"


def _ensure_ca(directory: Path, name: str, now: dt.datetime
               ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_file, cert_file = directory / "ca" / f"{name}.key", directory / f"{name}.pem"
    if key_file.exists() and cert_file.exists():
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        if (isinstance(key, ec.EllipticCurvePrivateKey)
                and cert.not_valid_after_utc - now > dt.timedelta(days=LEAF_DAYS)):
            return key, cert
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "genmesh"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"genmesh {name}")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write(key_file, _key_pem(key), private=True)
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _leaf(name: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
          ca_cert: x509.Certificate, hosts: tuple[str, ...], now: dt.datetime
          ) -> x509.Certificate:
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(spiffe_id(name)), x509.DNSName(target_name(name)),
        x509.DNSName(name)]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "genmesh"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
            # Every identity both serves and calls (a service dials the mesh listener;
            # Envoy dials the services).
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _is_valid_leaf(cert_file: Path, key_file: Path, ca_cert: x509.Certificate,
                   now: dt.datetime) -> bool:
    """The certificate is ``ca_cert``'s, not expiring soon, and of the key in ``key_file``
    (a key replaced alone, e.g. restored from a backup, would fail every handshake)."""
    if not cert_file.exists() or not key_file.exists():
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        return False
    return cert.not_valid_after_utc - now > RENEW_WITHIN


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes | str, *, private: bool = False) -> None:
    """Replace ``path`` atomically; a private file is created 0600 before it holds data."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover keeps its mode; O_EXCL then makes it anew
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
