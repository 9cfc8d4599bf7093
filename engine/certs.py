"""`ferry certs DIR`: a small CA and the two endpoint certificates, laid out as QEMU's tls-creds-x509 dir.

Writes ``ca-cert.pem`` (+ ``ca-key.pem``, kept to sign more), ``server-cert.pem``
/ ``server-key.pem`` (the listening destination) and ``client-cert.pem`` /
``client-key.pem`` (the connecting source), ECDSA P-256, keys mode 0600.
The server certificate names ``hosts`` (DNS names and IP addresses) in its
subjectAltName: the source checks the destination's name against it
(``tls-hostname``, default the URI's host). For a testbed; a site with its
own PKI points ``tls-creds`` at a directory of its own certificates.
"""
from __future__ import annotations

import datetime
import ipaddress
import os

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, org: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: str, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_certs(directory: str, hosts=DEFAULT_HOSTS, days: int = 365, org: str = "ferry",
               client_cn: str = "ferry-source", server_cn: str = "ferry-destination",
               ca_cn: str = "ferry-ca") -> dict:
    """Make the CA and endpoint certificates in ``directory`` (created); returns {role: path}.

    ``hosts``: names and IP addresses the server certificate is valid for.
    Raises ValueError for an empty host list, OSError for the directory.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    hosts = [h for h in hosts if h]
    if not hosts:
        raise ValueError("ferry certs: at least one host name or address for the server certificate")
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = _key()
    ca_name = _name(ca_cn, org)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    def endpoint(cn: str, usage, sans):
        key = _key()
        b = (x509.CertificateBuilder().subject_name(_name(cn, org)).issuer_name(ca_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server, server_key = endpoint(server_cn, ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client, client_key = endpoint(client_cn, ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(client_cn)])

    def pem_key(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    out = {}
    for name, cert, key in (("ca", ca, ca_key), ("server", server, server_key), ("client", client, client_key)):
        cp, kp = os.path.join(directory, f"{name}-cert.pem"), os.path.join(directory, f"{name}-key.pem")
        _write(cp, cert.public_bytes(serialization.Encoding.PEM), private=False)
        _write(kp, pem_key(key), private=True)
        out[name] = cp
    return out
