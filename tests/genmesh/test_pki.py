"""The mesh's secrets (genmesh/security/pki.py): what each certificate says, who signed
it, what is kept and what is made anew, file modes, Redis's ACL file and logins."""

from __future__ import annotations

import datetime as dt
import hashlib
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from genmesh.security import pki


def cert(secrets: pki.Secrets, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(secrets.cert(name).read_bytes())


def public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def secrets(tmp_path) -> pki.Secrets:
    return pki.ensure(tmp_path / "s", hosts=("127.0.0.1", "gateway"))


def test_envoy_alone_is_signed_by_the_gateway_ca_and_the_rest_by_the_service_ca(secrets):
    gateway_ca, service_ca = cert(secrets, pki.GATEWAY_CA), cert(secrets, pki.SERVICE_CA)
    cert(secrets, pki.GATEWAY).verify_directly_issued_by(gateway_ca)
    for name in (*pki.SERVICES, pki.OPERATOR):
        cert(secrets, name).verify_directly_issued_by(service_ca)
        with pytest.raises(ValueError):  # issuer names differ: not the gateway CA's
            cert(secrets, name).verify_directly_issued_by(gateway_ca)


def test_a_certificate_names_its_identity_and_the_hosts(secrets):
    c = cert(secrets, "worker")
    sans = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://genmesh.local/worker"]
    assert sans.get_values_for_type(x509.DNSName) == [
        "worker.genmesh.internal", "worker", "gateway"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_keys_and_passwords_are_private_and_the_ca_keys_apart(secrets):
    for path in [secrets.key(n) for n in pki.IDENTITIES] + [
            secrets.redis_password_file(u) for u in pki.REDIS_KEYS] + [
            secrets.directory / "ca" / "gateway-ca.key", secrets.redis_acl]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(secrets.directory.stat().st_mode) == 0o700
    assert not list(secrets.directory.glob("*ca.key"))  # only under ca/, never beside


def test_ensure_keeps_what_is_valid_and_remakes_what_is_not(tmp_path):
    first = pki.ensure(tmp_path / "s")
    before = {n: first.cert(n).read_bytes() for n in pki.IDENTITIES}
    password = first.redis_password("cache")
    again = pki.ensure(tmp_path / "s")
    assert {n: again.cert(n).read_bytes() for n in pki.IDENTITIES} == before
    assert again.redis_password("cache") == password
    # Expiring within the renewal window: made anew, same CA.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=pki.LEAF_DAYS) - pki.RENEW_WITHIN
    renewed = pki.ensure(tmp_path / "s", now=later + dt.timedelta(hours=1))
    assert renewed.cert("frontend").read_bytes() != before["frontend"]
    cert(renewed, "frontend").verify_directly_issued_by(cert(renewed, pki.SERVICE_CA))
    # A leaf of another CA (a copied file): replaced.
    other = pki.ensure(tmp_path / "other")
    (tmp_path / "s" / "cache.pem").write_bytes(other.cert("cache").read_bytes())
    fixed = pki.ensure(tmp_path / "s")
    cert(fixed, "cache").verify_directly_issued_by(cert(fixed, pki.SERVICE_CA))


def test_the_acl_file_turns_the_default_user_off_and_hashes_each_password(secrets):
    lines = secrets.redis_acl.read_text().splitlines()
    assert lines[0] == "user default off"
    cache = next(line for line in lines if line.startswith("user cache "))
    digest = hashlib.sha256(secrets.redis_password("cache").encode()).hexdigest()
    assert cache == (f"user cache on #{digest} resetkeys ~genmesh:cache:* ~genmesh:cache "
                     "resetchannels +@all -@dangerous")
    assert secrets.redis_password("cache") not in secrets.redis_acl.read_text()


def test_login_adds_a_user_and_its_password_once(secrets):
    password = secrets.redis_password("worker")
    assert pki.login("redis://127.0.0.1:6390/0", secrets, "worker") == (
        f"redis://worker:{password}@127.0.0.1:6390/0")
    assert pki.login("redis://me:pw@h:1/0", secrets, "worker") == "redis://me:pw@h:1/0"
    assert pki.login("redis://h:1/0", secrets, "tokenizer") == "redis://h:1/0"  # no user
    assert pki.login("", secrets, "worker") == ""


def test_the_command_makes_compose_readable_files_and_kubernetes_secrets(tmp_path, capsys):
    from genmesh.cli import main

    directory = tmp_path / "s"
    assert main(["secrets", "init", str(directory), "--compose"]) == 0
    s = pki.Secrets(directory)
    assert stat.S_IMODE(s.key("worker").stat().st_mode) == 0o644  # the container's user reads
    assert stat.S_IMODE(s.redis_acl.stat().st_mode) == 0o644
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700  # ... inside a private directory
    assert stat.S_IMODE((directory / "ca" / "service-ca.key").stat().st_mode) == 0o600
    capsys.readouterr()
    assert main(["secrets", "k8s", str(directory)]) == 0
    import yaml
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["metadata"]["name"] for d in docs] == [
        *(f"genmesh-secrets-{n}" for n in (pki.GATEWAY, *pki.SERVICES)), "genmesh-redis-acl"]
    before = s.cert("frontend").read_bytes()
    assert main(["secrets", "init", str(directory), "--renew"]) == 0
    assert s.cert("frontend").read_bytes() != before


def test_a_certificate_not_of_its_key_file_is_made_anew_with_its_key(tmp_path):
    """A key file replaced alone (restored from a backup, copied from another directory)
    would fail every handshake with the certificate still there: ensure makes the pair
    anew, as for any leaf it does not keep."""
    first = pki.ensure(tmp_path / "s")
    other = pki.ensure(tmp_path / "other")
    kept = first.cert("frontend").read_bytes()
    (tmp_path / "s" / "cache.key").write_bytes(other.key("cache").read_bytes())
    (tmp_path / "s" / "worker.key").write_bytes(b"not a key")
    fixed = pki.ensure(tmp_path / "s")
    assert fixed.cert("frontend").read_bytes() == kept  # the others' pairs are kept
    for name in ("cache", "worker"):
        pair = x509.load_pem_x509_certificate(fixed.cert(name).read_bytes())
        key = serialization.load_pem_private_key(fixed.key(name).read_bytes(), password=None)
        assert public_der(pair.public_key()) == public_der(key.public_key()), name
        pair.verify_directly_issued_by(cert(fixed, pki.SERVICE_CA))
    assert stat.S_IMODE(fixed.key("worker").stat().st_mode) == 0o600


def test_a_rerun_keeps_a_directory_made_for_compose_readable_until_no_compose(tmp_path,
                                                                              capsys):
    """Rerunning `secrets init` without --compose on a directory made with it (its keys
    renewed or not) keeps the files 0644, or the containers could no longer read them;
    --no-compose takes them back to 0600, and that too is kept."""
    from genmesh.cli import main

    directory = tmp_path / "s"
    s = pki.Secrets(directory)
    files = [s.key("envoy"), s.key("worker"), s.redis_password_file("cache"), s.redis_acl]

    def modes() -> set[int]:
        return {stat.S_IMODE(f.stat().st_mode) for f in files}

    assert main(["secrets", "init", str(directory), "--compose"]) == 0
    assert modes() == {0o644}
    assert main(["secrets", "init", str(directory)]) == 0  # the ACL file is rewritten
    assert modes() == {0o644} and "0644, for docker-compose" in capsys.readouterr().out
    assert main(["secrets", "init", str(directory), "--renew"]) == 0  # new keys
    assert modes() == {0o644}
    assert main(["secrets", "init", str(directory), "--no-compose"]) == 0
    assert modes() == {0o600}
    assert main(["secrets", "init", str(directory)]) == 0
    assert modes() == {0o600} and capsys.readouterr().out.rstrip().endswith("0600")
    assert stat.S_IMODE((directory / "ca" / "service-ca.key").stat().st_mode) == 0o600
